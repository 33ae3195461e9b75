//! The `imgfs` command line: argument definitions, logging, exit codes and
//! the helpers the subcommands share; each group of subcommands lives in
//! `cli/`. Everything a test would want to call lives in the library.

mod cli;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use cli::cache_cmd::{cache_ls, cache_prune, cache_rm, ps, pull};
use cli::convert_cmd::{ConvertArgs, convert};
use cli::image_cmd::{diff, inspect};
use cli::index_cmd::index_push;
use cli::mount_cmd::{mount_here, spawn_daemon, umount};
use imgfs::cache::Cache;
use imgfs::config::Config;
use imgfs::fuse;
use imgfs::image::Platform;
use imgfs::mount;
use imgfs::reference::Reference;
use imgfs::registry::{Client, ClientOptions};
use imgfs::store;
use indicatif::{MultiProgress, ProgressDrawTarget};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "imgfs",
    version,
    about = "Mount container images straight from a registry, fetching only the bytes that are read",
    long_about = "Mount container images straight from a registry, fetching only the bytes that are read.\n\n\
        References are resolved like `docker pull`: `alpine` is docker.io/library/alpine:latest, \
        `host:port/repo:tag` and `repo@sha256:...` work as expected. The first mount of a layer \
        scans it once (verifying its digest) to build an index kept in the cache; after that, \
        only the byte ranges that are read are fetched, verified and cached.\n\n\
        Examples:\n  imgfs mount alpine /mnt/a                      # writable; changes vanish at umount\n  \
        chroot /mnt/a /bin/sh\n  imgfs diff /mnt/a                              # what changed, like docker diff\n  \
        imgfs umount /mnt/a\n  \
        imgfs mount --upper ~/work/d debian:bookworm /mnt/d   # keep changes across mounts\n  \
        imgfs mount --read-only --platform linux/arm64 alpine /mnt/arm\n  \
        imgfs pull alpine; imgfs ps; imgfs images\n  \
        imgfs inspect --json 127.0.0.1:5000/team/app:v2",
    after_help = "Credentials come from $DOCKER_CONFIG/config.json or ~/.docker/config.json (docker login). \
        Set RUST_LOG or use -v for logs. Exit codes: 0 success, 1 failure, 2 usage error."
)]
struct Cli {
    /// More logging (-v info, -vv debug, -vvv trace); RUST_LOG overrides
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Cache directory [default: /var/cache/imgfs as root, $XDG_CACHE_HOME/imgfs otherwise]
    #[arg(long, global = true, env = "IMGFS_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Use plain HTTP for this registry (host[:port]); repeatable. Loopback registries always use HTTP
    #[arg(long = "insecure-registry", global = true, value_name = "HOST[:PORT]")]
    insecure_registries: Vec<String>,
    /// Configuration file read after /etc/imgfs/config.toml, instead of ~/.config/imgfs/config.toml
    #[arg(long, global = true, env = "IMGFS_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount an image (writable copy-on-write by default); returns once the mount is live
    Mount(MountArgs),
    /// Unmount an imgfs mount
    Umount {
        /// The mountpoint
        mountpoint: PathBuf,
    },
    /// List what a writable mount changed, like `docker diff` (A added, C changed, D deleted)
    #[command(
        after_help = "Examples:\n  imgfs diff /mnt/d\n  imgfs diff --upper ~/work/d-upper debian:bookworm"
    )]
    Diff {
        /// A mountpoint of a writable imgfs mount, or with --upper the image reference
        target: String,
        /// Read the changes from this upper directory (of an unmounted image) instead
        #[arg(long, value_name = "DIR")]
        upper: Option<PathBuf>,
        /// Platform of the image, with --upper
        #[arg(long)]
        platform: Option<String>,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// List live mounts: mountpoint, image, upper, pid, log, bytes fetched
    Ps {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// List the images in the cache (same as `imgfs cache ls`)
    Images {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Inspect and bound the cache
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Fetch an image fully into the cache, so later mounts read nothing from the network
    Pull {
        /// Image reference, e.g. alpine, 127.0.0.1:5000/team/app:v2, repo@sha256:...
        reference: String,
        /// Platform to pull from a multi-arch image, os/arch[/variant] [default: this host's]
        #[arg(long)]
        platform: Option<String>,
    },
    /// Rewrite an image's layers as eStargz or zstd:chunked and push it, for mounts without an indexing pass
    #[command(
        after_help = "Every platform of a multi-arch source is converted (or only --platform's, pushed as a single manifest). \
            Layers a TOC cannot describe exactly (names that are not UTF-8, sparse files) and foreign layers are kept as they are.\n\
            Examples:\n  imgfs convert 127.0.0.1:5000/app:v1 127.0.0.1:5000/app:v1-esgz\n  \
            imgfs convert --format zstd:chunked app:v1 app:v1-zc\n  \
            imgfs convert --record 'python3 -c pass' app:v1 app:v1-esgz   # files python reads at start go first"
    )]
    Convert {
        /// Image to read
        source: String,
        /// Where to push the converted image (a tag)
        destination: String,
        /// Layer format to write
        #[arg(long, value_enum, default_value_t = imgfs::convert::Target::Estargz)]
        format: imgfs::convert::Target,
        /// Convert only this platform, os/arch[/variant] [default: all]
        #[arg(long)]
        platform: Option<String>,
        /// File listing paths (one per line) to put first, before a .prefetch.landmark (eStargz)
        #[arg(long, value_name = "FILE")]
        prefetch_list: Option<PathBuf>,
        /// Mount the source, run CMD (sh -c) in a chroot under strace, and put the files it opens first
        #[arg(long, value_name = "CMD")]
        record: Option<String>,
        /// zstd level for zstd:chunked
        #[arg(long, default_value_t = imgfs::convert::DEFAULT_ZSTD_LEVEL)]
        zstd_level: i32,
        /// Print what was pushed as JSON
        #[arg(long)]
        json: bool,
    },
    /// Share layer indexes through the registry, so other machines skip the first-mount scan
    #[command(subcommand)]
    Index(IndexCommand),
    /// Show an image's platforms, manifest, layers and config without mounting it
    Inspect {
        /// Image reference, e.g. alpine, 127.0.0.1:5000/team/app:v2, repo@sha256:...
        reference: String,
        /// Platform to describe, os/arch[/variant] [default: this host's]
        #[arg(long)]
        platform: Option<String>,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum IndexCommand {
    /// Publish the indexes of an image's layers as an OCI artifact attached to its manifest
    #[command(
        after_help = "Mounts of the image on any machine then fetch the indexes instead of streaming each \
            gzip or tar layer once (the indexes are checked against the layer digest and a sample of the \
            layer's blocks). The artifact is found through the referrers API, or the sha256-<digest> tag \
            on registries without it.\nExample:\n  imgfs index push 127.0.0.1:5000/team/app:v2"
    )]
    Push {
        /// Image reference
        reference: String,
        /// Platform of a multi-arch image, os/arch[/variant] [default: this host's]
        #[arg(long)]
        platform: Option<String>,
        /// Print what was pushed as JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Images seen (references, digest, layers, bytes cached vs size, last use, where mounted)
    Ls {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Remove an image and the layers no other image uses (refused while mounted)
    Rm {
        /// Reference, manifest digest, or a prefix of its hex
        target: String,
        /// Remove the image record even while mounted (its layers stay until the mount ends)
        #[arg(long)]
        force: bool,
    },
    /// Evict cached layer data, least recently used first; layers of live mounts are kept
    #[command(
        after_help = "Without options, removes layers no image uses.\nExamples:\n  imgfs cache prune --max 10G\n  imgfs cache prune --older-than 7d\n  imgfs cache prune --all"
    )]
    Prune {
        /// Everything not mounted, indexes and image records included
        #[arg(long)]
        all: bool,
        /// Layers of images not used for this long (30m, 12h, 7d, 2w)
        #[arg(long, value_name = "DURATION", value_parser = store::parse_duration)]
        older_than: Option<Duration>,
        /// Evict until the cache is at most this big (512M, 10G)
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max: Option<u64>,
    },
}

#[derive(Args)]
struct MountArgs {
    /// Image reference, e.g. alpine, 127.0.0.1:5000/team/app:v2, repo@sha256:...
    reference: String,
    /// Existing directory to mount on
    mountpoint: PathBuf,
    /// Platform to mount from a multi-arch image, os/arch[/variant] [default: this host's]
    #[arg(long)]
    platform: Option<String>,
    /// Stay in the foreground (logs to stderr, Ctrl-C unmounts)
    #[arg(short, long)]
    foreground: bool,
    /// FUSE worker threads
    #[arg(long, default_value_t = fuse::DEFAULT_THREADS)]
    threads: usize,
    /// Keep changes in DIR (created if missing); mount again with the same
    /// --upper to see them. Default: a fresh directory removed at unmount
    #[arg(long, value_name = "DIR", conflicts_with = "read_only")]
    upper: Option<PathBuf>,
    /// Mount read-only (writes fail with EROFS)
    #[arg(long)]
    read_only: bool,
    /// Serve upper files through imgfs instead of FUSE passthrough
    #[arg(long)]
    no_passthrough: bool,
    /// Seconds a read may wait for the registry before failing with EIO
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    read_timeout: u64,
    /// Keep the cache under SIZE (512M, 10G) by evicting data of unmounted images, checked every 30 s [default: cache_max of the config file]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    cache_max: Option<u64>,
    /// What to fetch before it is read: none, landmark (the files eStargz
    /// layers mark as needed at start, before their .prefetch.landmark:
    /// fetched at once, in parallel, while the mount comes up) or all
    /// (every layer, whole, in the background)
    #[arg(long, value_enum, default_value_t = mount::Prefetch::Landmark)]
    prefetch: mount::Prefetch,
    /// Bandwidth cap of `--prefetch all` (10M, 50MiB/s; 0: no cap)
    #[arg(long, value_name = "BYTES/s", default_value = "50MiB/s", value_parser = parse_rate)]
    prefetch_rate: u64,
    /// Windows images: show the layers as they are (Files/, Hives/, ...)
    /// instead of C:\ at the root with the rest under .windows-layer/
    #[arg(long)]
    raw_layout: bool,
    #[arg(long = "daemon-child", hide = true)]
    daemon_child: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("imgfs: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, without repeating a cause the
/// message already quotes.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // rustls-platform-verifier logs each certificate it rejects as
        // an ERROR; imgfs reports the failure itself, once.
        tracing_subscriber::EnvFilter::new(format!(
            "imgfs={level},rustls_platform_verifier=off,warn"
        ))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours on a terminal only: a daemon's stderr is its log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn run(cli: Cli) -> Result<()> {
    // Flags (and their environment variables) win over the config files.
    let config = Config::load(cli.config.as_deref())?;
    let cache_dir = (cli.cache_dir.clone())
        .or_else(|| config.cache_dir.clone())
        .unwrap_or_else(Cache::default_root);
    let mut insecure_registries = config.insecure_registries.clone();
    insecure_registries.extend(cli.insecure_registries.iter().cloned());
    let client_options = ClientOptions {
        insecure_registries,
        mirrors: config.mirrors.clone(),
        ..ClientOptions::default()
    };
    match cli.command {
        Command::Mount(mut args) if args.foreground || args.daemon_child => {
            args.cache_max = args.cache_max.or(config.cache_max.map(|b| b.0));
            mount_here(&args, &cache_dir, client_options)
        }
        Command::Mount(args) => spawn_daemon(&args),
        Command::Umount { mountpoint } => umount(&mountpoint),
        Command::Diff {
            target,
            upper,
            platform,
            json,
        } => diff(
            &target,
            upper.as_deref(),
            platform.as_deref(),
            json,
            &cache_dir,
            client_options,
        ),
        Command::Ps { json } => ps(json),
        Command::Images { json } | Command::Cache(CacheCommand::Ls { json }) => {
            cache_ls(&cache_dir, json)
        }
        Command::Cache(CacheCommand::Rm { target, force }) => cache_rm(&cache_dir, &target, force),
        Command::Cache(CacheCommand::Prune {
            all,
            older_than,
            max,
        }) => {
            let options = store::PruneOptions {
                all,
                older_than,
                max_bytes: max,
            };
            cache_prune(&cache_dir, &options)
        }
        Command::Pull {
            reference,
            platform,
        } => pull(&reference, platform.as_deref(), &cache_dir, client_options),
        Command::Inspect {
            reference,
            platform,
            json,
        } => inspect(&reference, platform.as_deref(), json, client_options),
        Command::Index(IndexCommand::Push {
            reference,
            platform,
            json,
        }) => index_push(
            &reference,
            platform.as_deref(),
            json,
            &cache_dir,
            client_options,
        ),
        Command::Convert {
            source,
            destination,
            format,
            platform,
            prefetch_list,
            record,
            zstd_level,
            json,
        } => convert(
            &ConvertArgs {
                source: &source,
                destination: &destination,
                format,
                platform: platform.as_deref(),
                prefetch_list: prefetch_list.as_deref(),
                record: record.as_deref(),
                zstd_level,
                json,
            },
            &cache_dir,
            client_options,
        ),
    }
}

/// `--prefetch-rate`: a size per second, the `/s` optional.
fn parse_rate(text: &str) -> Result<u64, String> {
    parse_size(text.trim().trim_end_matches("/s"))
}

/// `--cache-max` and `--max`: sizes as the config file writes them.
fn parse_size(text: &str) -> Result<u64, String> {
    imgfs::config::ByteSize::parse(text).map(|b| b.0)
}

fn parse_platform(platform: Option<&str>) -> Result<Option<Platform>> {
    platform
        .map(Platform::parse)
        .transpose()
        .context("--platform")
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("imgfs-net")
        .build()
        .context("starting the async runtime")
}

/// Resolves the image and indexes its layers, with progress bars on stderr.
fn prepare(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    cache: &Cache,
    reference: &Reference,
    platform: Option<&Platform>,
) -> Result<mount::Prepared> {
    let progress = progress_target();
    Ok(runtime.block_on(mount::prepare(
        client, cache, reference, platform, &progress,
    ))?)
}

/// Bars on stderr; indicatif hides them when stderr is not a terminal.
fn progress_target() -> MultiProgress {
    MultiProgress::with_draw_target(ProgressDrawTarget::stderr())
}

/// `/var/lib/imgfs` as root, `$XDG_STATE_HOME/imgfs` (or
/// `~/.local/state/imgfs`) otherwise.
fn state_dir() -> PathBuf {
    imgfs::cache::per_user_dir("/var/lib/imgfs", "XDG_STATE_HOME", ".local/state")
}

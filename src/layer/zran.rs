//! Random access into gzip streams: zlib's `examples/zran.c` technique.
//!
//! A deflate stream can be entered at the start of any deflate block if one
//! knows the bit position of that block and the 32 KiB of output before it
//! (the history that back-references may reach). [`GzipIndexer`] inflates a
//! gzip blob once, streaming, and records such [`Checkpoint`]s every
//! `spacing` bytes of output; [`inflate_from`] later resumes at one of them
//! from just the compressed bytes that follow it.
//!
//! This is the only module of the crate that uses `unsafe`: it drives zlib's
//! C API (`libz-rs-sys`), because no safe wrapper exposes `inflatePrime`,
//! `inflateSetDictionary` on raw streams, or `Z_BLOCK` boundaries. Every
//! pointer handed to zlib comes from a slice borrowed for the one call that
//! uses it, and the `z_stream` lives in a `Box` so it never moves while zlib
//! holds its address.

use crate::layer::Checkpoint;
use libz_rs_sys as z;
use std::ffi::{CStr, c_int};

/// Deflate's maximum back-reference distance: the history a checkpoint keeps.
pub const WINDOW_SIZE: usize = 32 * 1024;

/// `windowBits` for a raw deflate stream with a 32 KiB window.
const WBITS_RAW: c_int = -15;
/// `windowBits` for a gzip-wrapped stream (15 + 16 selects the gzip wrapper).
const WBITS_GZIP: c_int = 15 + 16;

/// `data_type` after `inflate(Z_BLOCK)`: stopped at the end of a header or of
/// a deflate block, i.e. at the start of the next block.
const DT_BLOCK_BOUNDARY: c_int = 128;
/// `data_type`: the block just finished was the last one of the member.
const DT_LAST_BLOCK: c_int = 64;
/// `data_type`: number of unused bits in the bit buffer. zlib keeps fewer
/// than 8 there at a block boundary; zlib-rs's buffer is 64 bits wide, so the
/// mask is wider and a boundary with 8 or more buffered bits is not used.
const DT_BITS_MASK: c_int = 63;
const BITS_PER_BYTE: c_int = 8;

/// First byte of a gzip member header (RFC 1952 ID1).
const GZIP_ID1: u8 = 0x1f;
/// CRC32 + ISIZE after each member's deflate data (RFC 1952).
const GZIP_TRAILER_LEN: usize = 8;

/// Output buffer of the indexing pass: large, so the tar parser is called
/// rarely and inflate runs its fast loop.
const INDEX_OUT_CHUNK: usize = 256 * 1024;
/// zstd level for stored windows: ~3x smaller than raw, ~100 µs per window.
const WINDOW_ZSTD_LEVEL: i32 = 3;

/// A gzip stream could not be inflated.
#[derive(Debug, thiserror::Error)]
#[error("{reason} (compressed offset {offset})")]
pub struct ZranError {
    /// Offset in the compressed blob where the problem was seen.
    pub offset: u64,
    pub reason: String,
}

impl ZranError {
    fn new(offset: u64, reason: impl Into<String>) -> Self {
        ZranError {
            offset,
            reason: reason.into(),
        }
    }
}

/// Result of one `inflate` call.
struct Step {
    ret: c_int,
    consumed: usize,
    produced: usize,
}

/// An initialized zlib inflate stream. Boxed because zlib's state keeps a
/// pointer back to the `z_stream`.
struct Stream {
    strm: Box<z::z_stream>,
}

impl Stream {
    fn new(window_bits: c_int) -> Result<Self, String> {
        // `Default` installs zlib-rs's allocator callbacks, as inflateInit2_ requires.
        let mut strm = Box::new(z::z_stream::default());
        let size = c_int::try_from(std::mem::size_of::<z::z_stream>())
            .map_err(|_| "z_stream size does not fit a C int".to_string())?;
        // SAFETY: `strm` points to a live, default-initialized z_stream whose
        // zalloc/zfree/opaque are valid; the version string is the library's own.
        let ret = unsafe { z::inflateInit2_(&mut *strm, window_bits, z::zlibVersion(), size) };
        if ret != z::Z_OK {
            return Err(format!("inflateInit2 failed with code {ret}"));
        }
        Ok(Stream { strm })
    }

    fn reset(&mut self, window_bits: c_int) -> Result<(), String> {
        // SAFETY: the stream was initialized by `new` and is not ended until Drop.
        let ret = unsafe { z::inflateReset2(&mut *self.strm, window_bits) };
        if ret == z::Z_OK {
            Ok(())
        } else {
            Err(format!("inflateReset2 failed with code {ret}"))
        }
    }

    /// Feeds `bits` low bits of `value` before the next input byte.
    fn prime(&mut self, bits: c_int, value: c_int) -> Result<(), String> {
        // SAFETY: initialized stream; zlib validates `bits` itself.
        let ret = unsafe { z::inflatePrime(&mut *self.strm, bits, value) };
        if ret == z::Z_OK {
            Ok(())
        } else {
            Err(format!("inflatePrime failed with code {ret}"))
        }
    }

    fn set_dictionary(&mut self, dict: &[u8]) -> Result<(), String> {
        let len = u32::try_from(dict.len()).map_err(|_| "dictionary too large".to_string())?;
        // SAFETY: initialized stream; `dict` is valid for `len` bytes for the call.
        let ret = unsafe { z::inflateSetDictionary(&mut *self.strm, dict.as_ptr(), len) };
        if ret == z::Z_OK {
            Ok(())
        } else {
            Err(format!("inflateSetDictionary failed with code {ret}"))
        }
    }

    /// Copies the current history (up to 32 KiB, oldest first) into `buf`.
    fn dictionary(&self, buf: &mut [u8; WINDOW_SIZE]) -> usize {
        let mut len: u32 = 0;
        // SAFETY: initialized stream; `buf` holds WINDOW_SIZE bytes, the most
        // zlib ever copies for a 15-bit window; `len` is a valid out-pointer.
        let ret = unsafe { z::inflateGetDictionary(&*self.strm, buf.as_mut_ptr(), &mut len) };
        if ret == z::Z_OK {
            (len as usize).min(WINDOW_SIZE)
        } else {
            0
        }
    }

    fn data_type(&self) -> c_int {
        self.strm.data_type
    }

    /// zlib's message for the last error, if any.
    fn message(&self, ret: c_int) -> String {
        if self.strm.msg.is_null() {
            return format!("inflate failed with code {ret}");
        }
        // SAFETY: zlib sets `msg` to a static NUL-terminated string or leaves it null.
        let text = unsafe { CStr::from_ptr(self.strm.msg) };
        format!("inflate: {}", text.to_string_lossy())
    }

    /// One `inflate` call over `input` into `output`.
    fn inflate(&mut self, input: &[u8], output: &mut [u8], flush: c_int) -> Step {
        // zlib counts in 32 bits; larger slices are simply fed in parts.
        let avail_in = u32::try_from(input.len()).unwrap_or(u32::MAX);
        let avail_out = u32::try_from(output.len()).unwrap_or(u32::MAX);
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = avail_in;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = avail_out;
        // SAFETY: initialized stream; next_in/next_out point into slices that
        // stay borrowed for this call and hold avail_in/avail_out bytes.
        let ret = unsafe { z::inflate(&mut *self.strm, flush) };
        let step = Step {
            ret,
            consumed: (avail_in - self.strm.avail_in) as usize,
            produced: (avail_out - self.strm.avail_out) as usize,
        };
        // No pointer into the caller's slices survives the call.
        self.strm.next_in = std::ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = std::ptr::null_mut();
        self.strm.avail_out = 0;
        step
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: initialized in `new`, ended exactly once here.
        unsafe {
            z::inflateEnd(&mut *self.strm);
        }
    }
}

// SAFETY: the z_stream and the state it owns are only reached through
// `&mut self`/`&self` of this owner; zlib keeps no thread-local state.
unsafe impl Send for Stream {}

fn compress_window(window: &[u8]) -> Result<Vec<u8>, String> {
    if window.is_empty() {
        return Ok(Vec::new());
    }
    zstd::bulk::compress(window, WINDOW_ZSTD_LEVEL).map_err(|e| format!("compressing window: {e}"))
}

fn decompress_window(stored: &[u8]) -> Result<Vec<u8>, String> {
    if stored.is_empty() {
        return Ok(Vec::new());
    }
    zstd::bulk::decompress(stored, WINDOW_SIZE).map_err(|e| format!("checkpoint window: {e}"))
}

/// Where the indexing pass is between gzip members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Inside a member (header, deflate data or trailer).
    Member,
    /// A member ended; the next byte decides: another member or padding.
    BetweenMembers,
    /// Zero bytes after the last member (some tools pad blobs); only zeros may follow.
    Padding,
}

/// What the indexing pass produced.
#[derive(Debug)]
pub struct GzipIndex {
    pub checkpoints: Vec<Checkpoint>,
    /// Length of the uncompressed stream.
    pub stream_size: u64,
}

/// The streaming half of zran: inflates a whole gzip blob, handing the
/// output to a sink, and records a checkpoint at the first deflate block
/// boundary after every `spacing` bytes of output.
pub struct GzipIndexer {
    stream: Stream,
    spacing: u64,
    total_in: u64,
    total_out: u64,
    last_checkpoint: Option<u64>,
    checkpoints: Vec<Checkpoint>,
    phase: Phase,
    out: Vec<u8>,
    out_len: usize,
    window: Box<[u8; WINDOW_SIZE]>,
    /// The last compressed byte consumed: a new checkpoint's lead-in.
    last_in: u8,
    /// The newest checkpoint, while it is checked for needing its window.
    probe: Option<WindowProbe>,
}

/// Gathers what follows a checkpoint until its window's use is known: the
/// compressed bytes from the checkpoint on (lead-in byte first) and the
/// first [`WINDOW_SIZE`] bytes of output, the only output a back-reference
/// into the window can produce (deflate distances are at most 32 KiB).
/// If inflating those bytes with no window at all succeeds and gives the
/// same output, no back-reference reaches the window, and the checkpoint
/// is stored without it. That is the rule for stored blocks and already
/// compressed content (most of a layer of media, archives or random
/// data), where windows cannot be compressed and would otherwise be the
/// bulk of the index. A wrong guess is impossible: without a dictionary,
/// zlib refuses a distance reaching before the start of the span.
struct WindowProbe {
    checkpoint: usize,
    input: Vec<u8>,
    output: Vec<u8>,
}

impl WindowProbe {
    fn observe(&mut self, input: &[u8], output: &[u8]) {
        if self.complete() {
            return;
        }
        self.input.extend_from_slice(input);
        let room = WINDOW_SIZE - self.output.len();
        self.output
            .extend_from_slice(&output[..output.len().min(room)]);
    }

    fn complete(&self) -> bool {
        self.output.len() >= WINDOW_SIZE
    }

    /// Whether the span after `cp` inflates the same without its window.
    fn window_unused(&self, cp: &Checkpoint) -> bool {
        let bare = Checkpoint {
            out: cp.out,
            inp: cp.inp,
            bits: cp.bits,
            window: Vec::new(),
        };
        inflate_from(&bare, &self.input, 0, self.output.len()).is_ok_and(|out| out == self.output)
    }
}

impl GzipIndexer {
    pub fn new(spacing: u64) -> Result<Self, ZranError> {
        let stream = Stream::new(WBITS_GZIP).map_err(|e| ZranError::new(0, e))?;
        Ok(GzipIndexer {
            stream,
            spacing: spacing.max(1),
            total_in: 0,
            total_out: 0,
            last_checkpoint: None,
            checkpoints: Vec::new(),
            phase: Phase::Member,
            out: vec![0; INDEX_OUT_CHUNK],
            out_len: 0,
            window: Box::new([0; WINDOW_SIZE]),
            last_in: 0,
            probe: None,
        })
    }

    /// Compressed bytes consumed so far.
    pub fn total_in(&self) -> u64 {
        self.total_in
    }

    /// Inflates `input` (the next bytes of the blob), calling `sink` with the
    /// uncompressed output in order.
    pub fn feed<E: From<ZranError>>(
        &mut self,
        mut input: &[u8],
        mut sink: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut stalled = false;
        while !input.is_empty() {
            match self.phase {
                Phase::Padding => {
                    if let Some(pos) = input.iter().position(|&b| b != 0) {
                        return Err(self
                            .error_at(pos, "garbage after the last gzip member")
                            .into());
                    }
                    self.total_in += input.len() as u64;
                    if let Some(probe) = self.probe.as_mut() {
                        probe.observe(input, &[]);
                    }
                    input = &[];
                }
                Phase::BetweenMembers => {
                    if input[0] == GZIP_ID1 {
                        self.stream
                            .reset(WBITS_GZIP)
                            .map_err(|e| self.error_at(0, e))?;
                        self.phase = Phase::Member;
                    } else if input[0] == 0 {
                        self.phase = Phase::Padding;
                    } else {
                        return Err(self.error_at(0, "garbage after a gzip member").into());
                    }
                }
                Phase::Member => {
                    if self.out_len == self.out.len() {
                        self.flush(&mut sink)?;
                    }
                    let step =
                        self.stream
                            .inflate(input, &mut self.out[self.out_len..], z::Z_BLOCK);
                    let (used, rest) = input.split_at(step.consumed);
                    input = rest;
                    if let Some(&last) = used.last() {
                        self.last_in = last;
                    }
                    let produced = &self.out[self.out_len..self.out_len + step.produced];
                    if let Some(probe) = self.probe.as_mut() {
                        probe.observe(used, produced);
                    }
                    self.total_in += step.consumed as u64;
                    self.total_out += step.produced as u64;
                    self.out_len += step.produced;
                    match step.ret {
                        z::Z_OK => {}
                        z::Z_STREAM_END => self.phase = Phase::BetweenMembers,
                        // No progress possible: output full (flushed above on
                        // the next turn) or input used up (loop ends).
                        z::Z_BUF_ERROR => {}
                        ret => return Err(self.error_at(0, self.stream.message(ret)).into()),
                    }
                    let progress = step.consumed > 0 || step.produced > 0;
                    if !progress && self.out_len < self.out.len() {
                        if stalled {
                            return Err(self.error_at(0, "inflate made no progress").into());
                        }
                        stalled = true;
                    } else {
                        stalled = false;
                    }
                    self.maybe_checkpoint().map_err(|e| self.error_at(0, e))?;
                    if self.probe.as_ref().is_some_and(WindowProbe::complete) {
                        self.settle_probe();
                    }
                }
            }
        }
        self.flush(&mut sink)
    }

    /// Ends the pass: the blob must have ended after a complete member.
    pub fn finish(mut self) -> Result<GzipIndex, ZranError> {
        if self.phase == Phase::Member {
            let reason = if self.total_in == 0 {
                "empty gzip stream"
            } else {
                "gzip stream ends in the middle of a member"
            };
            return Err(ZranError::new(self.total_in, reason));
        }
        // The stream ended within a window's length of the last checkpoint:
        // everything that follows it is known.
        self.settle_probe();
        Ok(GzipIndex {
            checkpoints: self.checkpoints,
            stream_size: self.total_out,
        })
    }

    fn flush<E>(&mut self, sink: &mut impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
        if self.out_len > 0 {
            let len = std::mem::take(&mut self.out_len);
            sink(&self.out[..len])?;
        }
        Ok(())
    }

    /// Drops the probed checkpoint's window if it turned out unused.
    fn settle_probe(&mut self) {
        let Some(probe) = self.probe.take() else {
            return;
        };
        if let Some(cp) = self.checkpoints.get_mut(probe.checkpoint)
            && !cp.window.is_empty()
            && probe.window_unused(cp)
        {
            cp.window = Vec::new();
        }
    }

    fn error_at(&self, pos: usize, reason: impl Into<String>) -> ZranError {
        ZranError::new(self.total_in + pos as u64, reason)
    }

    /// Records a checkpoint if inflate stopped at a usable block boundary
    /// and enough output went by since the last one (the first one is taken
    /// right after the first gzip header, at output offset 0).
    fn maybe_checkpoint(&mut self) -> Result<(), String> {
        let dt = self.stream.data_type();
        if dt & (DT_BLOCK_BOUNDARY | DT_LAST_BLOCK) != DT_BLOCK_BOUNDARY {
            return Ok(());
        }
        let bits = dt & DT_BITS_MASK;
        if bits >= BITS_PER_BYTE {
            return Ok(());
        }
        let due = self
            .last_checkpoint
            .is_none_or(|last| self.total_out - last >= self.spacing);
        if !due {
            return Ok(());
        }
        let len = self.stream.dictionary(&mut self.window);
        let window = compress_window(&self.window[..len])?;
        let bits = bits as u8;
        self.checkpoints.push(Checkpoint {
            out: self.total_out,
            inp: self.total_in,
            bits,
            window,
        });
        self.last_checkpoint = Some(self.total_out);
        // A probe still open (checkpoints closer than a window) keeps its
        // window: what follows it is not all known yet.
        self.probe = Some(WindowProbe {
            checkpoint: self.checkpoints.len() - 1,
            input: if bits > 0 {
                vec![self.last_in]
            } else {
                Vec::new()
            },
            output: Vec::new(),
        });
        Ok(())
    }
}

/// Number of bytes before `cp.inp` that [`inflate_from`] needs: the byte
/// holding the checkpoint's leftover bits.
pub fn lead_in(cp: &Checkpoint) -> u64 {
    u64::from(cp.bits > 0)
}

/// Resumes inflation at `cp`, given the blob bytes starting at
/// `cp.inp - lead_in(cp)`: skips `skip` bytes of output and returns the
/// next `want` bytes. Returns fewer when the input ends first (the caller
/// passes only the span it needs) or the last gzip member ends. Continues
/// across gzip member boundaries.
pub fn inflate_from(
    cp: &Checkpoint,
    compressed: &[u8],
    skip: u64,
    want: usize,
) -> Result<Vec<u8>, ZranError> {
    let start = cp.inp - lead_in(cp).min(cp.inp);
    let err = |consumed: usize, reason: String| ZranError::new(start + consumed as u64, reason);
    let window = decompress_window(&cp.window).map_err(|e| err(0, e))?;
    let mut stream = Stream::new(WBITS_RAW).map_err(|e| err(0, e))?;
    let mut input = compressed;
    if cp.bits > 0 {
        let bits = c_int::from(cp.bits);
        if bits >= BITS_PER_BYTE {
            return Err(err(0, format!("checkpoint has {bits} leftover bits")));
        }
        let (&first, rest) = input
            .split_first()
            .ok_or_else(|| err(0, "no input for the checkpoint".into()))?;
        stream
            .prime(bits, c_int::from(first) >> (BITS_PER_BYTE - bits))
            .map_err(|e| err(0, e))?;
        input = rest;
    }
    if !window.is_empty() {
        stream.set_dictionary(&window).map_err(|e| err(0, e))?;
    }

    let mut out = vec![0u8; want];
    let mut got = 0usize;
    let mut to_skip = skip;
    let mut discard = if skip > 0 {
        vec![0u8; WINDOW_SIZE]
    } else {
        Vec::new()
    };
    while got < want {
        let consumed_before = compressed.len() - input.len();
        let target: &mut [u8] = if to_skip > 0 {
            let n = usize::try_from(to_skip)
                .unwrap_or(usize::MAX)
                .min(WINDOW_SIZE);
            &mut discard[..n]
        } else {
            &mut out[got..]
        };
        let step = stream.inflate(input, target, z::Z_NO_FLUSH);
        input = &input[step.consumed..];
        if to_skip > 0 {
            to_skip -= step.produced as u64;
        } else {
            got += step.produced;
        }
        match step.ret {
            z::Z_OK | z::Z_BUF_ERROR => {
                if step.consumed == 0 && step.produced == 0 {
                    break; // input exhausted
                }
            }
            z::Z_STREAM_END => {
                match next_member(&mut stream, input).map_err(|e| err(consumed_before, e))? {
                    Some(rest) => input = rest,
                    None => break,
                }
            }
            ret => return Err(err(consumed_before + step.consumed, stream.message(ret))),
        }
    }
    out.truncate(got);
    Ok(out)
}

/// After a member's deflate data ended: skips its trailer and, if another
/// member follows, its header, leaving `stream` ready for raw deflate data.
/// Returns the input after that header, or `None` at the end of the data
/// (input exhausted, or only zero padding left).
fn next_member<'a>(stream: &mut Stream, input: &'a [u8]) -> Result<Option<&'a [u8]>, String> {
    let Some(mut input) = input.get(GZIP_TRAILER_LEN..) else {
        return Ok(None);
    };
    if input.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    stream.reset(WBITS_GZIP)?;
    let mut scratch = [0u8; 1];
    loop {
        let step = stream.inflate(input, &mut scratch, z::Z_BLOCK);
        input = &input[step.consumed..];
        match step.ret {
            z::Z_OK | z::Z_BUF_ERROR => {}
            ret => return Err(stream.message(ret)),
        }
        if stream.data_type() & DT_BLOCK_BOUNDARY != 0 {
            break;
        }
        if step.consumed == 0 {
            return Ok(None); // the header runs past the end of the input
        }
    }
    stream.reset(WBITS_RAW)?;
    Ok(Some(input))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::test_data::noise;
    use flate2::Compression as Level;
    use flate2::write::GzEncoder;
    use std::io::Write;
    use std::process::{Command, Stdio};

    /// Compressible but varied content: a real binary, repeated with changes.
    fn sample(len: usize) -> Vec<u8> {
        let base =
            std::fs::read("/usr/bin/busybox").unwrap_or_else(|_| b"fallback text ".repeat(4096));
        let mut out = Vec::with_capacity(len);
        let mut round = 0u8;
        while out.len() < len {
            out.extend(base.iter().map(|b| b.wrapping_add(round)));
            round = round.wrapping_add(1);
        }
        out.truncate(len);
        out
    }

    /// GNU gzip, as most layers are made; zlib-rs's own level 1 writes a
    /// single block for megabytes, which leaves nothing to checkpoint.
    fn gzip(data: &[u8], level: u32) -> Vec<u8> {
        let mut child = Command::new("gzip")
            .arg(format!("-{level}"))
            .arg("-c")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("gzip runs");
        let mut stdin = child.stdin.take().unwrap();
        let input = data.to_vec();
        let feeder = std::thread::spawn(move || stdin.write_all(&input));
        let out = child.wait_with_output().unwrap();
        feeder.join().unwrap().unwrap();
        assert!(out.status.success());
        out.stdout
    }

    fn index(blob: &[u8], spacing: u64, piece: usize) -> Result<(GzipIndex, Vec<u8>), ZranError> {
        let mut indexer = GzipIndexer::new(spacing)?;
        let mut out = Vec::new();
        for chunk in blob.chunks(piece) {
            indexer.feed(chunk, |bytes: &[u8]| -> Result<(), ZranError> {
                out.extend_from_slice(bytes);
                Ok(())
            })?;
        }
        Ok((indexer.finish()?, out))
    }

    fn span_input<'a>(blob: &'a [u8], cps: &[Checkpoint], i: usize) -> &'a [u8] {
        let start = (cps[i].inp - lead_in(&cps[i])) as usize;
        let end = cps
            .get(i + 1)
            .map_or(blob.len(), |n| (n.inp as usize + 1).min(blob.len()));
        &blob[start..end]
    }

    #[test]
    fn checkpoints_resume_exactly() {
        let data = sample(6 << 20);
        for level in [1, 6, 9] {
            let blob = gzip(&data, level);
            let (idx, out) = index(&blob, 256 << 10, 100_000).unwrap();
            assert_eq!(out, data);
            assert_eq!(idx.stream_size, data.len() as u64);
            let cps = &idx.checkpoints;
            assert_eq!(cps[0].out, 0);
            assert!(cps.len() > 15, "level {level}: {} checkpoints", cps.len());
            assert!(cps.iter().any(|c| c.bits > 0), "no checkpoint mid-byte");
            for i in 0..cps.len() {
                let end = cps.get(i + 1).map_or(data.len() as u64, |n| n.out);
                let want = (end - cps[i].out) as usize;
                let got = inflate_from(&cps[i], span_input(&blob, cps, i), 0, want).unwrap();
                assert_eq!(
                    got,
                    &data[cps[i].out as usize..end as usize],
                    "level {level} span {i}"
                );
            }
            // Skipping inside a span, and reading past its end into the next.
            let cp = &cps[3];
            let from = (cp.inp - lead_in(cp)) as usize;
            let got = inflate_from(cp, &blob[from..], 12345, 400_000).unwrap();
            let at = cp.out as usize + 12345;
            assert_eq!(got, &data[at..at + 400_000]);
        }
    }

    #[test]
    fn windows_nothing_refers_to_are_not_stored() {
        // Incompressible data (stored blocks, or literals only): no span
        // reaches back before its checkpoint, so no window is kept.
        let data = noise(3 << 20, 0x1234_5678);
        let blob = gzip(&data, 6);
        let (idx, out) = index(&blob, 256 << 10, 50_000).unwrap();
        assert_eq!(out, data);
        let cps = &idx.checkpoints;
        assert!(cps.len() > 8, "{} checkpoints", cps.len());
        assert!(
            cps.iter().all(|c| c.window.is_empty()),
            "a window was kept for noise"
        );
        // Compressible data keeps them (its spans do refer back).
        let text = sample(3 << 20);
        let (kept, _) = index(&gzip(&text, 6), 256 << 10, 50_000).unwrap();
        let with_window = kept
            .checkpoints
            .iter()
            .filter(|c| !c.window.is_empty())
            .count();
        assert_eq!(
            with_window,
            kept.checkpoints.len() - 1,
            "only the first has none"
        );
        // Half noise, half text: every span still resumes exactly.
        let mut mixed = noise(1 << 20, 7);
        mixed.extend(sample(1 << 20));
        mixed.extend(noise(1 << 20, 9));
        for level in [1, 9] {
            let blob = gzip(&mixed, level);
            let (idx, _) = index(&blob, 128 << 10, 4096).unwrap();
            let cps = &idx.checkpoints;
            let dropped = cps.iter().skip(1).filter(|c| c.window.is_empty()).count();
            assert!(
                dropped > 0 && dropped < cps.len() - 1,
                "level {level}: {dropped} dropped"
            );
            for i in 0..cps.len() {
                let end = cps.get(i + 1).map_or(mixed.len() as u64, |n| n.out);
                let want = (end - cps[i].out) as usize;
                let got = inflate_from(&cps[i], span_input(&blob, cps, i), 0, want).unwrap();
                assert!(
                    got == mixed[cps[i].out as usize..end as usize],
                    "level {level} span {i}"
                );
            }
        }
    }

    #[test]
    fn huge_deflate_blocks_still_index() {
        let data = sample(3 << 20);
        let mut enc = GzEncoder::new(Vec::new(), Level::new(1));
        enc.write_all(&data).unwrap();
        let blob = enc.finish().unwrap();
        let (idx, out) = index(&blob, 64 << 10, 8192).unwrap();
        assert_eq!(out, data);
        let cp = idx.checkpoints.last().unwrap();
        let from = (cp.inp - lead_in(cp)) as usize;
        let got = inflate_from(cp, &blob[from..], 0, data.len()).unwrap();
        assert_eq!(got, &data[cp.out as usize..]);
    }

    #[test]
    fn multi_member_and_padding() {
        let data = sample(3 << 20);
        let cut = 1_234_567;
        let mut blob = gzip(&data[..cut], 6);
        blob.extend(gzip(&data[cut..], 1));
        blob.extend([0u8; 1000]);
        let (idx, out) = index(&blob, 128 << 10, 65536).unwrap();
        assert_eq!(out, data);
        let cps = &idx.checkpoints;
        // Resume in the first member and read across the member boundary to the end.
        let i = cps
            .iter()
            .rposition(|c| c.out < cut as u64 - 10_000)
            .unwrap();
        let from = (cps[i].inp - lead_in(&cps[i])) as usize;
        let got = inflate_from(&cps[i], &blob[from..], 0, data.len()).unwrap();
        assert_eq!(got, &data[cps[i].out as usize..]);
        // Garbage (not zeros) after the last member is refused.
        let mut bad = gzip(&data[..1000], 6);
        bad.extend(b"trailing junk");
        assert!(index(&bad, 1 << 20, 4096).is_err());
    }

    #[test]
    fn broken_streams_are_errors() {
        let data = sample(1 << 20);
        let blob = gzip(&data, 6);
        assert!(
            index(&blob[..blob.len() / 2], 1 << 20, 4096).is_err(),
            "truncated"
        );
        assert!(index(&[], 1 << 20, 4096).is_err(), "empty");
        assert!(
            index(b"not a gzip stream at all", 1 << 20, 4096).is_err(),
            "garbage"
        );
        let mut flipped = blob.clone();
        for b in &mut flipped[100..200] {
            *b ^= 0x5a;
        }
        assert!(index(&flipped, 1 << 20, 4096).is_err(), "corrupt");

        let (idx, _) = index(&blob, 64 << 10, 65536).unwrap();
        let cp = &idx.checkpoints[2];
        let invalid_blocks = vec![0xffu8; 4096];
        assert!(inflate_from(cp, &invalid_blocks, 0, 100_000).is_err());
        let mut bad_window = cp.clone();
        bad_window.window = b"not zstd".to_vec();
        assert!(inflate_from(&bad_window, span_input(&blob, &idx.checkpoints, 2), 0, 10).is_err());
        let mut bad_bits = cp.clone();
        bad_bits.bits = 9;
        assert!(inflate_from(&bad_bits, span_input(&blob, &idx.checkpoints, 2), 0, 10).is_err());
        // Random bytes: an error or some output, never a panic.
        let random = noise(50_000, 0x1234_5678);
        for cp in &idx.checkpoints {
            let _ = inflate_from(cp, &random, 0, 1 << 20);
        }
        // Input that ends early gives fewer bytes, not an error.
        let short = &span_input(&blob, &idx.checkpoints, 2)[..1000];
        let got = inflate_from(cp, short, 0, 1 << 20).unwrap();
        assert!(!got.is_empty() && got.len() < 1 << 20);
        assert_eq!(got, &data[cp.out as usize..cp.out as usize + got.len()]);
    }
}

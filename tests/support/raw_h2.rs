//! A raw HTTP/2 client for misbehaving on purpose: it writes frames by
//! hand over a plain `TcpStream`, so it can open more streams than the
//! server allows or send a header block larger than the server takes,
//! which a real client (hyper, h2, reqwest) refuses to do. Headers are
//! HPACK literals without indexing, so no encoder state is needed; only
//! the `:status` of answers is decoded, and only when the server sent it
//! as a static-table index.
//!
//! The end-to-end tests (`tests/hostile.rs`) and the load harness's
//! hostile scenario (`benches/proxy/scenarios/hostile.rs`) both use it.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Largest frame payload a peer must accept without asking for more.
pub const MAX_FRAME_PAYLOAD: usize = 16_384;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// `RST_STREAM` error code for a stream the server did not process.
pub const REFUSED_STREAM: u32 = 0x7;

/// `GOAWAY` error code for a peer that is causing too much work.
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame as read from the wire.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a `RST_STREAM` or `GOAWAY`.
    pub fn error_code(&self) -> Option<u32> {
        let code = match self.kind {
            RST_STREAM => self.payload.get(0..4)?,
            GOAWAY => self.payload.get(4..8)?,
            _ => return None,
        };
        Some(u32::from_be_bytes(code.try_into().ok()?))
    }

    /// The `:status` of a `HEADERS` frame that begins with it, as servers
    /// send it: an index into HPACK's static table (200, 204, 206, 304,
    /// 400, 404, 500), or a literal with the static `:status` name, plain
    /// or Huffman-coded.
    pub fn status(&self) -> Option<u16> {
        if self.kind != HEADERS {
            return None;
        }
        let mut block = &self.payload[..];
        if self.flags & 0x8 != 0 {
            // Padded: a length byte first.
            block = block.get(1..)?;
        }
        if self.flags & 0x20 != 0 {
            // Priority: stream dependency and weight.
            block = block.get(5..)?;
        }
        let (&first, rest) = block.split_first()?;
        match first {
            0x88 => Some(200),
            0x89 => Some(204),
            0x8a => Some(206),
            0x8b => Some(304),
            0x8c => Some(400),
            0x8d => Some(404),
            0x8e => Some(500),
            // Literal with incremental indexing, or without, or never
            // indexed, each naming static entry 8 (`:status`).
            0x48 | 0x08 | 0x18 => {
                let (&length, value) = rest.split_first()?;
                let value = value.get(..usize::from(length & 0x7f))?;
                let digits = if length & 0x80 == 0 {
                    value.to_vec()
                } else {
                    huffman_digits(value)?
                };
                std::str::from_utf8(&digits).ok()?.parse().ok()
            }
            _ => None,
        }
    }
}

/// Decodes a Huffman-coded string of ASCII digits (RFC 7541, Appendix B:
/// `0`-`2` are 5-bit codes 0-2, `3`-`9` are 6-bit codes 25-31); `None`
/// for anything else.
fn huffman_digits(bytes: &[u8]) -> Option<Vec<u8>> {
    let bits = bytes.len() * 8;
    let bit = |index: usize| (bytes[index / 8] >> (7 - index % 8)) & 1;
    let read =
        |from: usize, count: usize| (from..from + count).fold(0_u8, |value, index| value << 1 | bit(index));
    let mut digits = Vec::new();
    let mut at = 0;
    while bits - at >= 5 {
        let short = read(at, 5);
        if short <= 2 {
            digits.push(b'0' + short);
            at += 5;
        } else if bits - at >= 6 && (25..=31).contains(&read(at, 6)) {
            digits.push(b'3' + read(at, 6) - 25);
            at += 6;
        } else {
            break;
        }
    }
    // What is left must be padding: fewer than 8 one bits.
    let padding = bits - at;
    (padding < 8 && (at..bits).all(|index| bit(index) == 1)).then_some(digits)
}

/// An HTTP/2 connection driven frame by frame.
pub struct RawH2 {
    stream: TcpStream,
}

impl RawH2 {
    /// Connects, exchanges SETTINGS and acknowledges the server's, so the
    /// server enforces its own limits from the next frame on.
    pub async fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut connection = Self { stream };
        connection.stream.write_all(PREFACE).await?;
        connection.write_frame(SETTINGS, 0, 0, &[]).await?;
        loop {
            let frame = connection.read_frame().await?;
            if frame.kind == SETTINGS && frame.flags & ACK == 0 {
                connection.write_frame(SETTINGS, ACK, 0, &[]).await?;
                return Ok(connection);
            }
        }
    }

    /// Sends a request head on `stream` (an odd id, higher than the last),
    /// split into `HEADERS` and `CONTINUATION` frames as large as allowed.
    pub async fn headers(
        &mut self,
        stream: u32,
        fields: &[(&str, &str)],
        end_stream: bool,
    ) -> io::Result<()> {
        let block = header_block(fields);
        let mut chunks = block.chunks(MAX_FRAME_PAYLOAD).peekable();
        let mut kind = HEADERS;
        let mut flags = if end_stream { END_STREAM } else { 0 };
        while let Some(chunk) = chunks.next() {
            if chunks.peek().is_none() {
                flags |= END_HEADERS;
            }
            self.write_frame(kind, flags, stream, chunk).await?;
            kind = CONTINUATION;
            flags = 0;
        }
        Ok(())
    }

    /// Begins a request head on `stream` and leaves it unfinished: a
    /// `HEADERS` frame without `END_HEADERS`.
    pub async fn headers_unfinished(&mut self, stream: u32, fields: &[(&str, &str)]) -> io::Result<()> {
        self.write_frame(HEADERS, 0, stream, &header_block(fields)).await
    }

    /// Goes on with an unfinished head: one more `CONTINUATION` frame,
    /// again without `END_HEADERS`, holding `fields`.
    pub async fn continuation(&mut self, stream: u32, fields: &[(&str, &str)]) -> io::Result<()> {
        self.write_frame(CONTINUATION, 0, stream, &header_block(fields))
            .await
    }

    /// Sends `data` on `stream`, ending it.
    pub async fn data(&mut self, stream: u32, data: &[u8]) -> io::Result<()> {
        self.write_frame(DATA, END_STREAM, stream, data).await
    }

    /// The next frame from the server; PINGs are answered on the way.
    pub async fn read_frame(&mut self) -> io::Result<Frame> {
        loop {
            let mut head = [0_u8; 9];
            self.stream.read_exact(&mut head).await?;
            let length = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0_u8; length];
            self.stream.read_exact(&mut payload).await?;
            let frame = Frame {
                kind: head[3],
                flags: head[4],
                stream,
                payload,
            };
            if frame.kind == PING && frame.flags & ACK == 0 {
                self.write_frame(PING, ACK, 0, &frame.payload).await?;
                continue;
            }
            return Ok(frame);
        }
    }

    /// Waits until the server closes the connection, reading past what it
    /// sends and answering nothing (not even a PING: a client in the
    /// middle of a header block may send nothing but its continuation).
    pub async fn until_closed(&mut self) {
        let mut buffer = [0_u8; 4096];
        while matches!(self.stream.read(&mut buffer).await, Ok(read) if read > 0) {}
    }

    async fn write_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) -> io::Result<()> {
        let length = u32::try_from(payload.len())
            .ok()
            .filter(|length| *length < 1 << 24)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
        let mut frame = Vec::with_capacity(9 + payload.len());
        frame.extend_from_slice(&length.to_be_bytes()[1..]);
        frame.push(kind);
        frame.push(flags);
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        self.stream.write_all(&frame).await
    }
}

/// `fields` as an HPACK header block of literals without indexing.
fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        // Literal header field without indexing, new name.
        block.push(0);
        encode_string(&mut block, name.as_bytes());
        encode_string(&mut block, value.as_bytes());
    }
    block
}

/// An HPACK string literal, not Huffman-coded: its length as a 7-bit
/// prefix integer, then the bytes.
fn encode_string(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut length = bytes.len();
    if length < 0x7f {
        out.push(length as u8);
    } else {
        out.push(0x7f);
        length -= 0x7f;
        while length >= 0x80 {
            out.push((length % 0x80) as u8 | 0x80);
            length /= 0x80;
        }
        out.push(length as u8);
    }
    out.extend_from_slice(bytes);
}

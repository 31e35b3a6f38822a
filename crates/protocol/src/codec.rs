//! Framing: every message is one frame, a 4-byte big-endian payload length followed
//! by the payload, the message encoded with [postcard](https://docs.rs/postcard).
//!
//! A frame longer than [`MAX_FRAME_LEN`] is refused before any of it is buffered,
//! so a peer that sends garbage costs at most one small read and ends its link with
//! [`FrameError::TooLarge`] or [`FrameError::Malformed`].
//!
//! The blocking helpers ([`write_frame`], [`read_frame`]) serve the layer, which must
//! not run an async runtime inside the user's process; [`FrameCodec`] (feature
//! `codec`) serves the async peers.

use std::io::{self, Read, Write};

use serde::{Serialize, de::DeserializeOwned};

/// The largest payload a frame may carry, in bytes (16 MiB).
pub const MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// The largest data chunk graft puts into one `Data` or file frame, in bytes (1 MiB),
/// well below [`MAX_FRAME_LEN`] so a chunk plus its envelope always fits.
pub const MAX_CHUNK_LEN: usize = 1024 * 1024;

/// Length of the frame header in bytes.
pub const HEADER_LEN: usize = 4;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame longer than the limit ([`MAX_FRAME_LEN`], or
    /// less for a peer that has not authenticated yet).
    #[error(
        "the peer sent a frame of {len} bytes, more than the limit of {max} bytes; \
         the peer is not a graft of this version, or misbehaves"
    )]
    TooLarge {
        /// The announced payload length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The payload is not a valid encoding of the expected message.
    #[error("the peer sent a malformed frame: {0}")]
    Malformed(postcard::Error),
    /// The message could not be encoded (a bug: every graft message encodes).
    #[error("could not encode a message: {0}")]
    Encode(postcard::Error),
    /// Reading or writing the underlying stream failed.
    #[error("link I/O failed: {0}")]
    Io(io::Error),
}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> FrameError {
        FrameError::Io(e)
    }
}

impl FrameError {
    /// Whether this error means the peer closed the stream between frames.
    pub fn is_closed(&self) -> bool {
        matches!(self, FrameError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof)
    }
}

/// Encodes `message` into one complete frame (header and payload).
///
/// # Errors
///
/// [`FrameError::Encode`] if postcard fails, [`FrameError::TooLarge`] if the payload
/// exceeds [`MAX_FRAME_LEN`].
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let mut frame = vec![0u8; HEADER_LEN];
    frame = postcard::to_extend(message, frame).map_err(FrameError::Encode)?;
    let len = frame.len() - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    frame[..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(frame)
}

/// Decodes one payload (a frame without its header).
///
/// # Errors
///
/// [`FrameError::Malformed`] when the bytes are not a valid `T`, including trailing
/// bytes after it.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (message, rest) = postcard::take_from_bytes(payload).map_err(FrameError::Malformed)?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(
            postcard::Error::DeserializeBadEncoding,
        ));
    }
    Ok(message)
}

/// Writes one frame to a blocking writer.
///
/// # Errors
///
/// As [`encode_frame`], plus [`FrameError::Io`] when the write fails.
pub fn write_frame<W: Write, T: Serialize>(writer: &mut W, message: &T) -> Result<(), FrameError> {
    writer.write_all(&encode_frame(message)?)?;
    Ok(())
}

/// Reads one frame from a blocking reader.
///
/// # Errors
///
/// [`FrameError::Io`] with `UnexpectedEof` when the peer closed the stream (see
/// [`FrameError::is_closed`]), [`FrameError::TooLarge`] for an oversized header,
/// [`FrameError::Malformed`] for a bad payload.
pub fn read_frame<R: Read, T: DeserializeOwned>(reader: &mut R) -> Result<T, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    reader.read_exact(&mut header)?;
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload)?;
    decode_payload(&payload)
}

#[cfg(feature = "codec")]
pub use async_codec::FrameCodec;

#[cfg(feature = "codec")]
mod async_codec {
    use std::marker::PhantomData;

    use bytes::{Buf, BufMut, BytesMut};
    use serde::{Serialize, de::DeserializeOwned};
    use tokio_util::codec::{Decoder, Encoder};

    use super::{FrameError, HEADER_LEN, MAX_FRAME_LEN, decode_payload};

    /// The most buffer space reserved ahead of the bytes received, in bytes.
    const RESERVE_AHEAD: usize = 64 * 1024;

    /// A tokio-util codec that decodes frames into `In` and encodes `Out` as frames.
    ///
    /// The agent uses `FrameCodec<ClientMessage, AgentMessage>`, the proxy the mirror
    /// image.
    ///
    /// A codec refuses incoming frames longer than its limit ([`MAX_FRAME_LEN`]
    /// unless set with [`FrameCodec::with_max_len`]) as soon as their header
    /// arrives, and it buffers only what has arrived, never the announced length
    /// ahead of the bytes: a peer that announces a large frame and stalls costs
    /// what it actually sent.
    pub struct FrameCodec<In, Out> {
        max_len: usize,
        _marker: PhantomData<fn(Out) -> In>,
    }

    impl<In, Out> Default for FrameCodec<In, Out> {
        fn default() -> Self {
            Self {
                max_len: MAX_FRAME_LEN,
                _marker: PhantomData,
            }
        }
    }

    impl<In, Out> FrameCodec<In, Out> {
        /// A new codec that accepts frames up to [`MAX_FRAME_LEN`].
        pub fn new() -> Self {
            Self::default()
        }

        /// A new codec that accepts incoming frames of at most `max_len` payload
        /// bytes (capped at [`MAX_FRAME_LEN`]); for peers that are not yet
        /// authenticated or only ever send small messages.
        pub fn with_max_len(max_len: usize) -> Self {
            Self {
                max_len: max_len.min(MAX_FRAME_LEN),
                _marker: PhantomData,
            }
        }

        /// Changes the incoming frame limit (capped at [`MAX_FRAME_LEN`]), e.g.
        /// once a peer has authenticated.
        pub fn set_max_len(&mut self, max_len: usize) {
            self.max_len = max_len.min(MAX_FRAME_LEN);
        }

        /// The incoming frame limit, in payload bytes.
        pub fn max_len(&self) -> usize {
            self.max_len
        }
    }

    impl<In: DeserializeOwned, Out> Decoder for FrameCodec<In, Out> {
        type Item = In;
        type Error = FrameError;

        fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
            if src.len() < HEADER_LEN {
                return Ok(None);
            }
            let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
            if len > self.max_len {
                return Err(FrameError::TooLarge {
                    len,
                    max: self.max_len,
                });
            }
            if src.len() < HEADER_LEN + len {
                // Room for what is missing, but never more than one read's worth
                // ahead of the bytes that came: the buffer grows with the data.
                src.reserve((HEADER_LEN + len - src.len()).min(RESERVE_AHEAD));
                return Ok(None);
            }
            src.advance(HEADER_LEN);
            let payload = src.split_to(len);
            decode_payload(&payload).map(Some)
        }
    }

    impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
        type Error = FrameError;

        fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
            let start = dst.len();
            dst.put_u32(0);
            let payload = postcard::to_extend(&item, Vec::new()).map_err(FrameError::Encode)?;
            if payload.len() > MAX_FRAME_LEN {
                dst.truncate(start);
                return Err(FrameError::TooLarge {
                    len: payload.len(),
                    max: MAX_FRAME_LEN,
                });
            }
            dst[start..start + HEADER_LEN].copy_from_slice(&(payload.len() as u32).to_be_bytes());
            dst.extend_from_slice(&payload);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{LayerRequest, LayerResponse};

    #[test]
    fn frame_round_trips() {
        let msg = LayerRequest::Listen {
            port: 80,
            deliver_to: "127.0.0.1:8080".parse().unwrap(),
            pid: 42,
        };
        let frame = encode_frame(&msg).unwrap();
        let back: LayerRequest = read_frame(&mut &frame[..]).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn oversized_header_is_refused_without_reading_payload() {
        let header = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        let err = read_frame::<_, LayerResponse>(&mut &header[..]).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len, .. } if len == MAX_FRAME_LEN + 1));
    }

    #[cfg(feature = "codec")]
    #[test]
    fn a_codec_limit_refuses_at_the_header_and_buffers_only_what_came() {
        use bytes::BytesMut;
        use tokio_util::codec::Decoder;
        let mut codec = FrameCodec::<LayerResponse, LayerResponse>::with_max_len(1024);
        let mut src = BytesMut::from(&2048u32.to_be_bytes()[..]);
        let err = codec.decode(&mut src).unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::TooLarge {
                    len: 2048,
                    max: 1024
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("limit of 1024 bytes"), "{err}");

        // Within the limit, a stalled 15 MiB frame reserves one read ahead, not 15 MiB.
        codec.set_max_len(MAX_FRAME_LEN);
        let mut src = BytesMut::from(&(15u32 << 20).to_be_bytes()[..]);
        assert!(codec.decode(&mut src).unwrap().is_none());
        assert!(src.capacity() < 1 << 20, "reserved {}", src.capacity());
    }

    #[test]
    fn garbage_payload_is_malformed() {
        let frame = [0, 0, 0, 3, 0xff, 0xff, 0xff];
        let err = read_frame::<_, LayerResponse>(&mut &frame[..]).unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)), "{err:?}");
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut frame = encode_frame(&LayerResponse::Ok).unwrap();
        frame.push(0);
        let len = (frame.len() - HEADER_LEN) as u32;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(
            read_frame::<_, LayerResponse>(&mut &frame[..]),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn data_bytes_are_encoded_as_one_length_and_the_raw_bytes() {
        use crate::{ConnectionId, link::ClientMessage};
        let frame = encode_frame(&ClientMessage::Data {
            conn: ConnectionId(1),
            bytes: vec![7; 300],
        })
        .unwrap();
        // header, variant index, conn id varint, length varint (300 = 0xac 0x02), bytes
        assert_eq!(frame.len(), HEADER_LEN + 1 + 1 + 2 + 300);
        assert!(frame[HEADER_LEN + 4..].iter().all(|b| *b == 7));
    }

    #[test]
    fn eof_between_frames_is_closed() {
        let err = read_frame::<_, LayerResponse>(&mut &[][..]).unwrap_err();
        assert!(err.is_closed());
    }

    #[cfg(feature = "codec")]
    #[test]
    fn async_codec_matches_blocking_framing() {
        use bytes::BytesMut;
        use tokio_util::codec::{Decoder, Encoder};
        let mut codec = FrameCodec::<LayerResponse, LayerResponse>::new();
        let mut buf = BytesMut::new();
        codec.encode(LayerResponse::Ok, &mut buf).unwrap();
        assert_eq!(&buf[..], &encode_frame(&LayerResponse::Ok).unwrap()[..]);
        let mut partial = BytesMut::from(&buf[..3]);
        assert!(codec.decode(&mut partial).unwrap().is_none());
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(LayerResponse::Ok));
    }
}

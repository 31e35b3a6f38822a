//! Shared body of the frame fuzz targets: the same bytes go through both
//! decoders graft uses (the blocking `read_frame` of the layer and the tokio
//! `FrameCodec` of the agent and proxy). Neither may panic, both must agree,
//! a frame whose header claims more than `MAX_FRAME_LEN` is refused, and every
//! message that decodes re-encodes to a frame that decodes to the same message.

use std::fmt::Debug;
use std::io::Cursor;

use bytes::BytesMut;
use graft_protocol::codec::{FrameCodec, FrameError, MAX_FRAME_LEN, encode_frame, read_frame};
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::codec::Decoder;

/// Decodes every frame in `data` with both decoders and checks they agree.
pub fn check<T: DeserializeOwned + Serialize + PartialEq + Debug>(data: &[u8]) {
    let mut codec = FrameCodec::<T, T>::new();
    let mut buf = BytesMut::from(data);
    let mut cursor = Cursor::new(data);
    loop {
        let streamed = codec.decode(&mut buf);
        let blocking: Result<T, FrameError> = read_frame(&mut cursor);
        match (streamed, blocking) {
            (Ok(Some(a)), Ok(b)) => {
                assert_eq!(a, b, "the two decoders disagree");
                let again = encode_frame(&a).expect("a decoded message re-encodes");
                let back: T =
                    read_frame(&mut Cursor::new(&again)).expect("re-encoded frame decodes");
                assert_eq!(back, a, "the message does not survive a round trip");
            }
            // Not enough bytes for a whole frame: the blocking reader hits EOF.
            (Ok(None), Err(e)) => {
                assert!(e.is_closed(), "partial frame but {e:?}");
                return;
            }
            (
                Err(FrameError::TooLarge { len, max }),
                Err(FrameError::TooLarge {
                    len: len2,
                    max: max2,
                }),
            ) => {
                assert!(len > max && len == len2 && max == max2 && max <= MAX_FRAME_LEN);
                return;
            }
            (Err(_), Err(_)) => return,
            (a, b) => panic!(
                "decoders disagree: {:?} vs {:?}",
                a.map(|_| ()),
                b.map(|_| ())
            ),
        }
    }
}

//! Frame codec micro-benchmarks: encoding and decoding the messages that carry
//! most bytes (`Data` frames of 1 KiB and 64 KiB) and the smallest control
//! message, through the async codec the agent and proxy use.
//!
//! Run with `cargo bench -p graft-protocol --features codec`.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use graft_protocol::{
    ConnectionId,
    codec::FrameCodec,
    link::{AgentMessage, ClientMessage},
};
use tokio_util::codec::{Decoder, Encoder};

fn data_frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("data frame");
    for size in [1024usize, 64 * 1024] {
        let message = ClientMessage::Data {
            conn: ConnectionId(7),
            bytes: vec![0xab; size],
        };
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("encode {size} B"), |b| {
            let mut codec = FrameCodec::<AgentMessage, ClientMessage>::new();
            let mut buf = BytesMut::with_capacity(size + 64);
            b.iter(|| {
                buf.clear();
                codec.encode(message.clone(), &mut buf).unwrap();
            })
        });
        let mut encoded = BytesMut::new();
        FrameCodec::<AgentMessage, ClientMessage>::new()
            .encode(message.clone(), &mut encoded)
            .unwrap();
        group.bench_function(format!("decode {size} B"), |b| {
            let mut codec = FrameCodec::<ClientMessage, AgentMessage>::new();
            b.iter(|| {
                let mut buf = encoded.clone();
                codec.decode(&mut buf).unwrap().unwrap()
            })
        });
    }
    group.finish();
}

fn control_frames(c: &mut Criterion) {
    let message = ClientMessage::Ping(42);
    c.bench_function("ping round trip", |b| {
        let mut enc = FrameCodec::<AgentMessage, ClientMessage>::new();
        let mut dec = FrameCodec::<ClientMessage, AgentMessage>::new();
        let mut buf = BytesMut::with_capacity(64);
        b.iter(|| {
            enc.encode(message.clone(), &mut buf).unwrap();
            dec.decode(&mut buf).unwrap().unwrap()
        })
    });
}

criterion_group!(benches, data_frames, control_frames);
criterion_main!(benches);

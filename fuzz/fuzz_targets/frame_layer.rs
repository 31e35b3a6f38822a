//! Fuzzes the decoding of `LayerRequest` frames (what the proxy reads from a
//! program's layer connection) and `LayerResponse` frames (what the layer reads
//! back) with both decoders; see `frames.rs`.
#![no_main]

use graft_protocol::layer::{LayerRequest, LayerResponse};
use libfuzzer_sys::fuzz_target;

mod frames;

fuzz_target!(|data: &[u8]| {
    frames::check::<LayerRequest>(data);
    frames::check::<LayerResponse>(data);
});

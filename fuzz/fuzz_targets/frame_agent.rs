//! Fuzzes the decoding of `AgentMessage` frames (what the agent or proxy reads from
//! the link) with both decoders; see `frames.rs`.
#![no_main]

use graft_protocol::link::AgentMessage;
use libfuzzer_sys::fuzz_target;

mod frames;

fuzz_target!(|data: &[u8]| frames::check::<AgentMessage>(data));

//! Fuzzes the agent's side of the handshake: the first frame is decoded as a
//! `ClientMessage`; a `Hello`'s version goes through `check_compatible`, which
//! must accept exactly the versions compatible with ours and never panic. The
//! raw bytes are also tried as a version string.
#![no_main]

use graft_protocol::PROTOCOL_VERSION;
use graft_protocol::codec::decode_payload;
use graft_protocol::link::ClientMessage;
use graft_protocol::version::check_compatible;
use libfuzzer_sys::fuzz_target;

fn version(text: &str) {
    if check_compatible(text).is_ok() {
        // Whatever is accepted must at least share our major version.
        let ours = PROTOCOL_VERSION.split('.').next().unwrap();
        let theirs = text.trim_start_matches('v').split('.').next().unwrap_or("");
        assert_eq!(ours, theirs, "{text:?} accepted against {PROTOCOL_VERSION}");
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(ClientMessage::Hello(hello)) = decode_payload::<ClientMessage>(data) {
        version(&hello.version);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        version(text);
    }
});

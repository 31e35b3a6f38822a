//! Issue 11 point 1, `graft run --isolate`: COMMAND runs in a private network
//! and mount namespace whose only way out is graft's user-space TCP/IP stack.

use graft_tests::Bed;

#[test]
fn isolated_curl_reaches_the_service_only_the_target_reaches() {
    let bed = Bed::new();
    let out = bed.run(
        &["--isolate"],
        &["curl", "-sS", "--max-time", "10", &bed.service_url()],
    );
    assert_eq!(out.assert_success().out(), bed.service_reply());
}

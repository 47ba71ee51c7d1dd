//! A short, fixed-seed run of the kernel oracle (`cargo xtask oracle` runs 100,000 frames):
//! the same frames into a real kernel without a filter, behind the daemon dropping, and behind
//! it rejecting; nothing the kernel accepts gets past the policy, nothing allowed is stopped,
//! every reset is right.

use smtpguard_tests::oracle;

#[test]
fn the_kernel_accepts_no_connection_the_policy_forbids() {
    let report = oracle::run(0x5347_0002, 3000);
    // The oracle sees something: the kernel answered SYNs without a filter, and the filter
    // answered some with resets.
    assert!(
        report.runs[0].syn_acks > 100,
        "the kernel answered too few SYNs without a filter for the oracle to judge:\n{report}"
    );
    assert!(
        report.good_rsts + report.bad_rsts.count > 0,
        "the reject run sent no reset at all:\n{report}"
    );
    assert!(
        report.clean(),
        "expected no bypass, no wrongly stopped SYN, no bad RST and no capture loss; got:\n{report}"
    );
}

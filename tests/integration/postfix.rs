//! End to end: a real Postfix (Debian package) with Dovecot SASL asks a real valvulad
//! process, at each restriction stage, and the SMTP client sees the module's answer.

use std::time::Duration;

use valvula_tests::daemon::Proc;
use valvula_tests::module_path;
use valvula_tests::postfix::{PASSWORD, PASSWORD2, Postfix, STAGES, USER, USER2, send_mail};

const TEXT: &str = "blocked by the valvula test module";

fn valvulad_blocking(sender: &str) -> Proc {
    Proc::start(
        &format!(
            "[server]\nmodule_dirs = [{:?}]\n\
             [[listener]]\nname = \"main\"\naddress = \"127.0.0.1:0\"\nmodules = [\"mod-test\"]\n\
             [module.mod-test]\naction = \"reject\"\ntext = \"{TEXT}\"\n\
             [module.mod-test.when]\nsender = \"{sender}\"\n",
            module_path("mod_test")
                .parent()
                .unwrap()
                .display()
                .to_string()
        ),
        &[],
    )
}

fn stage_case(stage: &str, refused_at: &str, prefix: &str) {
    let v = valvulad_blocking("blocked@example.com");
    let pf = Postfix::start(&v.addrs()[0], &[stage], "");
    let log = |pf: &Postfix| format!("maillog:\n{}\nvalvulad:\n{}", pf.maillog(), v.log());

    // Authenticated, allowed sender: 250 after the message.
    let ok = send_mail(pf.port, Some((USER, PASSWORD)), USER, &["bob@example.com"]);
    assert!(ok.accepted(), "{stage}: {ok:?}\n{}", log(&pf));
    // Authenticated, blocked sender: the module's REJECT with its text.
    let no = send_mail(
        pf.port,
        Some((USER2, PASSWORD2)),
        "blocked@example.com",
        &["carol@example.com"],
    );
    assert_eq!(
        (no.step.as_str(), no.code),
        (refused_at, 554),
        "{stage}: {no:?}\n{}",
        log(&pf)
    );
    assert!(
        no.text.contains(prefix) && no.text.contains(TEXT),
        "{stage}: {no:?}"
    );
    // Without AUTH: a remote sender to a local domain passes; the blocked one does not.
    let ok = send_mail(pf.port, None, "someone@remote.test", &["bob@example.com"]);
    assert!(ok.accepted(), "{stage}: {ok:?}\n{}", log(&pf));
    let no = send_mail(pf.port, None, "blocked@example.com", &["bob@example.com"]);
    assert_eq!(
        (no.step.as_str(), no.code),
        (refused_at, 554),
        "{stage}: {no:?}"
    );

    // Every decision was logged by valvulad, one line each.
    assert!(
        v.wait_for_count(" decision ", 4, Duration::from_secs(5)),
        "{}",
        v.log()
    );
    // The two accepted messages really reached the sink.
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while pf.delivered() < 2 && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(pf.delivered(), 2, "{}", log(&pf));
}

#[test]
fn sender_stage() {
    assert_eq!(STAGES[0], "smtpd_sender_restrictions");
    // With smtpd_delay_reject=yes (the default), sender restrictions run at RCPT.
    stage_case(
        "smtpd_sender_restrictions",
        "RCPT",
        "Sender address rejected",
    );
}

#[test]
fn recipient_stage() {
    stage_case(
        "smtpd_recipient_restrictions",
        "RCPT",
        "Recipient address rejected",
    );
}

#[test]
fn data_stage() {
    stage_case("smtpd_data_restrictions", "DATA", "Data command rejected");
}

#[test]
fn end_of_data_stage() {
    stage_case(
        "smtpd_end_of_data_restrictions",
        ".",
        "End-of-data rejected",
    );
}

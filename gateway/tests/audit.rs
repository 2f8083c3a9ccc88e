//! The per-request audit line: every field an operator greps for, in the same JSON shape
//! as every other log line, and no secret that a client put in the path.

mod common;

use common::*;

#[tokio::test]
async fn a_denied_request_is_one_complete_json_line_with_the_path_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start(dir.path()).await;
    let gw = Gateway::start(
        &plaintext_args(&up, &[]),
        &[("METRICS_AUTH_TOKEN", TOKEN_A)],
    )
    .await;
    let client = Client::plain();
    let mut conn = client.connect(gw.addr).await.unwrap();
    assert_eq!(
        send(&mut conn, "/metrics", Some("wrong-token-zzzzzzzzzzzz"))
            .await
            .unwrap()
            .0,
        401
    );
    assert_eq!(
        send(&mut conn, "/debug/password=hunter2-canary", Some(TOKEN_A))
            .await
            .unwrap()
            .0,
        404
    );
    gw.wait_audit("bad_token", 1).await;
    gw.wait_audit("path", 1).await;

    let lines = gw.audit();
    let bad = lines.iter().find(|v| v["reason"] == "bad_token").unwrap();
    assert_eq!(bad["level"], "WARN");
    assert_eq!(bad["message"], "denied");
    assert_eq!(bad["method"], "GET");
    assert_eq!(bad["path"], "/metrics");
    assert!(bad["remote"].as_str().unwrap().starts_with("127.0.0.1:"));
    let ts = bad["timestamp"].as_str().unwrap();
    assert!(
        ts.len() == 27 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
        "RFC 3339 with microseconds, UTC: {ts}"
    );

    let path = lines.iter().find(|v| v["reason"] == "path").unwrap();
    assert_eq!(path["path"], "/debug/password=[REDACTED]");
    let all = gw.logs().join("\n");
    assert!(
        !all.contains("hunter2-canary"),
        "a secret in the path was logged"
    );
    assert!(
        !all.contains("wrong-token-zzzz"),
        "a presented token was logged"
    );
}

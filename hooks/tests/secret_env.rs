//! Webhook secrets from environment variables. A test binary of its own, with
//! one test, because setting a variable is only sound while no other thread
//! reads the environment.

use std::time::Duration;

use kiln_hooks::{Event, Hooks, verify_signature};
use kiln_proto::spec::{HookSink, HookSpec};

const VARIABLE: &str = "KILN_HOOKS_TEST_SECRET";

fn spec(url: &str, variable: &str) -> HookSpec {
    HookSpec {
        sink: HookSink::Webhook,
        url: Some(url.to_string()),
        secret_env: Some(variable.to_string()),
        secret_file: None,
        command: Vec::new(),
        events: Vec::new(),
        max_retries: 0,
        timeout_secs: 10.0,
    }
}

#[test]
fn secret_env_is_read_up_front_with_clear_errors() -> anyhow::Result<()> {
    // Before any other thread exists in this process (no runtime yet).
    // SAFETY: this binary's only test; nothing else runs or reads the environment.
    unsafe {
        std::env::remove_var(VARIABLE);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _entered = runtime.enter();

    let error = Hooks::new(&[spec("http://127.0.0.1:9/", VARIABLE)])
        .unwrap_err()
        .to_string();
    assert_eq!(
        error,
        "hooks[0].secret_env: environment variable KILN_HOOKS_TEST_SECRET is not set \
         (it should hold the webhook's HMAC key)"
    );
    let error = Hooks::new(&[spec("http://127.0.0.1:9/", "")])
        .unwrap_err()
        .to_string();
    assert_eq!(
        error,
        "hooks[0].secret_env: \"\" is not an environment variable name"
    );
    drop(_entered);

    // SAFETY: as above; the current-thread runtime has started no thread.
    unsafe {
        std::env::set_var(VARIABLE, "");
    }
    let _entered = runtime.enter();
    let error = Hooks::new(&[spec("http://127.0.0.1:9/", VARIABLE)])
        .unwrap_err()
        .to_string();
    assert_eq!(
        error,
        "hooks[0].secret_env: environment variable KILN_HOOKS_TEST_SECRET is empty"
    );
    drop(_entered);

    // SAFETY: as above.
    unsafe {
        std::env::set_var(VARIABLE, "from-the-environment");
    }
    runtime.block_on(async {
        let (sender, mut received) = tokio::sync::mpsc::unbounded_channel();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let sender = sender.clone();
                    async move {
                        let _ = sender.send((headers, body));
                        axum::http::StatusCode::NO_CONTENT
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        let hooks = Hooks::new(&[spec(&url, VARIABLE)])?;
        hooks.emit(Event::new(
            "job.finished",
            "digits",
            serde_json::json!({"job": "digits"}),
        ));
        anyhow::ensure!(hooks.flush(Duration::from_secs(60)).await, "not flushed");
        let (headers, body) = received.recv().await.expect("one delivery");
        let header = |name: &str| headers[name].to_str().unwrap().to_string();
        assert!(verify_signature(
            b"from-the-environment",
            &header("x-kiln-timestamp"),
            &body,
            &header("x-kiln-signature"),
        ));
        assert_eq!(hooks.stats()[0].delivered, 1);
        server.abort();
        Ok(())
    })
}

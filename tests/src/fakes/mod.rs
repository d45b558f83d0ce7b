//! Local fakes of the outside APIs the bridge calls, enforcing the rules the real ones do.

pub mod google;
pub mod hubspot;
pub mod meta;

/// Serves `app` on an ephemeral loopback port until the test process ends; returns its base URL.
pub async fn serve(app: axum::Router) -> String {
    serve_on("127.0.0.1:0", app).await
}

/// Serves `app` on `addr` until the process ends; returns its base URL.
pub async fn serve_on(addr: &str, app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

//! Local fakes of the outside APIs the bridge calls, enforcing the rules the real ones do.

pub mod hubspot;
pub mod meta;

/// Serves `app` on an ephemeral loopback port until the test process ends; returns its base URL.
pub async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

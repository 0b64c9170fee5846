//! An unmodified axum router served over Split-OS.
//!
//!     cargo run --release -p splitos --features axum --example axum_hello -- 127.0.0.1:3000
//!     curl http://127.0.0.1:3000/hello/world
//!
//! Runs the TCP server embedded in this process unless SPLITOS_SOCKET names a running one.

use axum::{extract::Path, routing::get, Router};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".into());
    if std::env::var_os("SPLITOS_SOCKET").is_none() {
        let session = splitos::embedded::start(splitos::embedded::Options::default())
            .and_then(|e| e.session());
        match session.and_then(splitos::set_default_session) {
            Ok(()) => {}
            Err(e) => {
                eprintln!("axum_hello: cannot start the embedded TCP server: {e}");
                std::process::exit(1);
            }
        }
    }
    let app = Router::new()
        .route("/", get(|| async { "Hello from axum over Split-OS\n" }))
        .route(
            "/hello/{name}",
            get(|Path(name): Path<String>| async move { format!("Hello, {name}!\n") }),
        );
    let listener = match splitos::tokio::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("axum_hello: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    if let Ok(a) = listener.local_addr() {
        println!("axum_hello: listening on http://{a}");
    }
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("axum_hello: {e}");
        std::process::exit(1);
    }
}

//! The pages, embedded in the binary: one HTML shell, its script and its
//! style sheet. The script routes by the URL's fragment (`#/jobs`,
//! `#/jobs/NAME`, `#/checkpoints`, `#/registry`, `#/serving`).

use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const STYLE_CSS: &str = include_str!("../assets/style.css");

/// Headers every page carries: no framing by other sites, no sniffing, and a
/// content security policy that allows only this origin's script and style.
const SECURITY: [(header::HeaderName, &str); 3] = [
    (header::X_FRAME_OPTIONS, "DENY"),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
    ),
];

/// The HTML shell (`GET /`).
pub async fn index() -> Response {
    (
        SECURITY,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        INDEX,
    )
        .into_response()
}

/// `app.js` or `style.css` (`GET /assets/{name}`); 404 for any other name.
pub async fn asset(Path(name): Path<String>) -> Response {
    let (body, kind) = match name.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "style.css" => (STYLE_CSS, "text/css; charset=utf-8"),
        _ => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    (SECURITY, [(header::CONTENT_TYPE, kind)], body).into_response()
}

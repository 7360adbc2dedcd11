//! The web dashboard at `/`: static files compiled into the binary (no build step, no network
//! at run time), served with a content security policy that allows only this origin. The page
//! reads the same public REST API and event streams as any script (see `dashboard/app.js`);
//! this module only hands out its files.

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// One embedded file: its name under `/ui/`, media type and bytes.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const INDEX: &str = include_str!("../dashboard/index.html");

const ASSETS: &[Asset] = &[
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../dashboard/app.js"),
    },
    Asset {
        name: "api.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../dashboard/api.js"),
    },
    Asset {
        name: "charts.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../dashboard/charts.js"),
    },
    Asset {
        name: "style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../dashboard/style.css"),
    },
];

/// Scripts, styles and connections from this origin only; no inline script. (Scripts set
/// element styles through the DOM, which the policy allows.)
const CSP: &str = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

fn page(content_type: &'static str, body: &'static str) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The files change with the binary; revalidating keeps an upgraded daemon's page current.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// `GET /`: the dashboard page.
pub async fn index() -> Response {
    page("text/html; charset=utf-8", INDEX)
}

/// `GET /ui/{file}`: a script or style sheet of the page.
pub async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|a| a.name == file) {
        Some(a) => page(a.content_type, a.body),
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("no dashboard file `{file}`"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file the page loads is served, so a renamed file cannot leave the page broken.
    #[test]
    fn every_referenced_file_is_embedded() {
        let mut referenced: Vec<&str> = Vec::new();
        for text in std::iter::once(INDEX).chain(ASSETS.iter().map(|a| a.body)) {
            for part in text.split("/ui/").skip(1) {
                referenced.push(part.split(['"', '\'']).next().unwrap_or(""));
            }
            for part in text.split("from \"./").skip(1) {
                referenced.push(part.split('"').next().unwrap_or(""));
            }
        }
        assert!(referenced.len() >= 4, "{referenced:?}");
        for name in referenced {
            assert!(
                ASSETS.iter().any(|a| a.name == name),
                "`{name}` is referenced but not embedded"
            );
        }
    }
}

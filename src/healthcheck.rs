//! `envgate healthcheck`: asks a running envgate's admin listener whether it is ready (`GET
//! /readyz`), for a container's `HEALTHCHECK` (the runtime image has no shell and no curl).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// Where the admin listener is when nothing says otherwise: `admin_listen`'s documented example.
pub const DEFAULT_ADMIN: &str = "http://127.0.0.1:9464";

/// The admin listener's URL: `--admin` when given, else made from `admin_listen` as
/// `ENVGATE_ADMIN_LISTEN` or the config file sets it (in envgate's own order: the variable over
/// the file), else [`DEFAULT_ADMIN`]. An unspecified address (`0.0.0.0`, `::`) is reached on
/// loopback.
pub fn admin_url(flag: Option<&str>, env_listen: Option<&str>, file_listen: Option<&str>) -> Result<String, String> {
    if let Some(url) = flag {
        return Ok(url.trim_end_matches('/').to_string());
    }
    let Some(listen) = env_listen.filter(|s| !s.is_empty()).or(file_listen) else {
        return Ok(DEFAULT_ADMIN.to_string());
    };
    let mut addr: SocketAddr =
        listen.parse().map_err(|_| format!("admin_listen is {listen:?}, not an address like \"127.0.0.1:9464\""))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    Ok(format!("http://{addr}"))
}

/// `admin_listen` from a config file, if the file sets it. Only that key is read: the
/// healthcheck must not fail on the rest of a configuration the running envgate accepted.
pub fn admin_listen_in_file(path: &Path) -> Result<Option<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let table: toml::Table = text.parse().map_err(|e| format!("{}: {e}", path.display()))?;
    match table.get("admin_listen") {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("{}: admin_listen is not a string", path.display())),
    }
}

/// `GET {admin}/readyz` within `timeout`: `Ok` with the answer's first line when it is 200, else
/// `Err` with why not.
pub async fn check(admin: &str, timeout: Duration) -> Result<String, String> {
    let url = format!("{admin}/readyz");
    let uri: Uri = url.parse().map_err(|_| format!("{url} is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url}: the admin listener speaks plain http"));
    }
    let authority = uri.authority().ok_or_else(|| format!("{url} has no host"))?.clone();
    let port = authority.port_u16().unwrap_or(80);
    let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
    let exchange = async {
        let stream = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("{url}: {e}"))?;
        tokio::spawn(conn);
        let req = Request::get(uri.path())
            .header(http::header::HOST, authority.as_str())
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| format!("{url}: {e}"))?;
        let resp = send.send_request(req).await.map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| format!("{url}: {e}"))?.to_bytes();
        let first = String::from_utf8_lossy(&body).lines().next().unwrap_or("").trim().to_string();
        Ok::<_, String>((status, first))
    };
    let (status, first) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("{url}: no answer within {}", humantime::format_duration(timeout)))??;
    let first: String = first.chars().take(200).collect();
    if status == StatusCode::OK {
        Ok(format!("{url}: {first}"))
    } else {
        Err(format!("{url}: {} {first}", status.as_u16()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_url_from_flag_variable_file_or_default() {
        assert_eq!(admin_url(Some("http://h:1/"), Some("0.0.0.0:2"), Some("0.0.0.0:3")).unwrap(), "http://h:1");
        assert_eq!(admin_url(None, Some("0.0.0.0:9464"), Some("127.0.0.1:3")).unwrap(), "http://127.0.0.1:9464");
        assert_eq!(admin_url(None, Some(""), Some("127.0.0.2:3")).unwrap(), "http://127.0.0.2:3");
        assert_eq!(admin_url(None, None, Some("[::]:9464")).unwrap(), "http://[::1]:9464");
        assert_eq!(admin_url(None, None, Some("[::1]:9")).unwrap(), "http://[::1]:9");
        assert_eq!(admin_url(None, None, None).unwrap(), DEFAULT_ADMIN);
        assert!(admin_url(None, Some("localhost"), None).unwrap_err().contains("admin_listen"));
    }

    #[test]
    fn only_admin_listen_is_read_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("envgate.toml");
        std::fs::write(&f, "admin_listen = \"0.0.0.0:9464\"\nmode = \"not a mode\"\n").unwrap();
        assert_eq!(admin_listen_in_file(&f).unwrap().as_deref(), Some("0.0.0.0:9464"));
        std::fs::write(&f, "listen = \"0.0.0.0:8889\"\n").unwrap();
        assert_eq!(admin_listen_in_file(&f).unwrap(), None);
        std::fs::write(&f, "admin_listen = 9464\n").unwrap();
        assert!(admin_listen_in_file(&f).is_err());
        assert!(admin_listen_in_file(&dir.path().join("missing.toml")).is_err());
    }
}

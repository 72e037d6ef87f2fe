//! What a reload reads, and what the admin listener shows: the files the configuration names
//! (for the watch that reloads when one changes), and the effective settings as JSON (the same
//! content `envgate check` prints, made from its text rather than rendered a second time).

use std::path::PathBuf;

use super::settings::{Raw, Settings};
use super::{Config, ConfigError, Opts};

impl Settings {
    /// Every file a setting names that envgate reads (every `FilePath` row of the table; the
    /// audit log is written, not read, and is not one). A test checks that the list is complete.
    fn files(&self) -> Vec<PathBuf> {
        [
            &self.tls_cert,
            &self.tls_key,
            &self.upstream_ca,
            &self.upstream_client_cert,
            &self.upstream_client_key,
            &self.upstream_token_file,
            &self.jwt_keys,
        ]
        .into_iter()
        .flatten()
        .map(|s| s.value.clone())
        .collect()
    }
}

/// The files a reload would read: the config file (if any) and every file the settings name,
/// from `text` (the config file's text as just read) and the flags, without the checks between
/// settings. So a config that names a file that does not exist yet, and fails to load for it,
/// still has that file watched, and loads once it appears. `Err` only when `text` is no valid
/// config file at all (a TOML syntax error, an unknown key, a value of the wrong type).
pub fn watched_files(opts: &Opts, text: Option<&str>) -> Result<Vec<PathBuf>, ConfigError> {
    let mut raw = match (&opts.config, text) {
        (Some(path), Some(text)) => Raw::from_toml(text, path)?,
        _ => Raw::default(),
    };
    raw.overlay(opts)?;
    let mut files: Vec<PathBuf> = opts.config.iter().cloned().collect();
    for f in raw.resolve()?.files() {
        if !files.contains(&f) {
            files.push(f);
        }
    }
    Ok(files)
}

/// What stands for a secret in [`Config::effective_json`].
pub const SET: &str = "<set>";

impl Config {
    /// [`Config::effective`] as JSON: its TOML, parsed, with each secret's comment line
    /// (`# upstream_token: set (not shown)`) as the key with the value `"<set>"`, and what
    /// `jwt_keys` holds as `jwt_keys_hold`. A path setting shows its path, never the file.
    pub fn effective_json(&self) -> serde_json::Value {
        effective_json(&self.effective())
    }
}

fn effective_json(text: &str) -> serde_json::Value {
    let mut out = match text.parse::<toml::Table>() {
        Ok(t) => serde_json::to_value(t).unwrap_or_default(),
        // `effective` writes a valid config file (a test holds it to that); should it ever not,
        // say so rather than show part of it.
        Err(e) => serde_json::json!({ "error": format!("the effective settings are not valid TOML: {e}") }),
    };
    for line in text.lines().take_while(|l| !l.starts_with('[')) {
        let Some(comment) = line.strip_prefix("# ") else { continue };
        if let Some(key) = comment.strip_suffix(": set (not shown)") {
            out[key] = serde_json::Value::from(SET);
        } else if let Some(what) = comment.strip_prefix("jwt_keys holds ") {
            out["jwt_keys_hold"] = serde_json::Value::from(what);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_path_setting_is_watched() {
        let rows: Vec<&str> = include_str!("settings.rs")
            .lines()
            .filter_map(|l| l.trim().split_once(": FilePath,").map(|(k, _)| k))
            .collect();
        assert!(rows.len() >= 7, "{rows:?}");
        let text: String = rows.iter().map(|k| format!("{k} = \"/files/{k}\"\n")).collect();
        let opts = Opts { config: Some("/etc/envgate.toml".into()), ..Opts::default() };
        let files = watched_files(&opts, Some(&text)).unwrap();
        assert_eq!(files[0], PathBuf::from("/etc/envgate.toml"));
        for k in rows {
            assert!(files.contains(&PathBuf::from(format!("/files/{k}"))), "{k} is not watched: {files:?}");
        }
        // No config file: only what the flags name.
        let flags = Opts { tls_cert: Some("/c.pem".into()), ..Opts::default() };
        assert_eq!(watched_files(&flags, None).unwrap(), vec![PathBuf::from("/c.pem")]);
        // A file the checks would refuse (a certificate without its key) is still watched...
        assert_eq!(watched_files(&opts, Some("tls_cert = \"/x\"")).unwrap()[1], PathBuf::from("/x"));
        // ...and a broken file says so.
        assert!(watched_files(&opts, Some("tls_cert = ")).is_err());
    }

    #[test]
    fn the_json_shows_what_check_prints_and_no_secret() {
        let config = Config::from_toml(
            "upstream_token = \"s3cr3t-token\"\ntrusted_user_header = \"X-User\"\nclient_envs = [\"A\"]\n\
             [users.bob]\nclient_envs = [\"B\"]\n",
        )
        .unwrap();
        let json = config.effective_json();
        assert_eq!(json["upstream_token"], SET);
        assert_eq!(json["client_envs"], serde_json::json!(["A"]));
        assert_eq!(json["users"]["bob"]["client_envs"], serde_json::json!(["B"]));
        assert_eq!(json["mode"], "drop");
        assert_eq!(json["listen"], "127.0.0.1:8889");
        assert!(json["value_patterns"]["KERNEL_UID"].is_string());
        assert!(!json.to_string().contains("s3cr3t"));
        // Every key `check` prints is there.
        for line in config.effective().lines().take_while(|l| !l.starts_with('[')) {
            if let Some((key, _)) = line.split_once(" = ") {
                assert!(!json[key].is_null(), "{key} missing");
            }
        }
    }
}

//! The grouping key: the group's URL, `<url>/metrics/job/<job>{/<label>/<value>}`, encoded the
//! Pushgateway's way.

use http::Uri;

use super::PushgatewayConfigError;

/// Validates the base URL, job and labels and builds the group's URL.
pub(super) fn grouping_url(
    base: &str,
    job: &str,
    labels: &[(String, String)],
) -> Result<String, PushgatewayConfigError> {
    let invalid = |reason| PushgatewayConfigError::InvalidUrl {
        url: without_credentials(base),
        reason,
    };
    // Before parsing: a password holding `/`, `?` or `#`, pasted unencoded, ends the authority
    // early (`http::Uri` then reads a host of `user` and a "port" of the password's start, and
    // the rest lands in the path). A base URL with an `@` anywhere is refused.
    if base.contains('@') {
        return Err(invalid(
            "credentials in the URL are not sent (and a URL holding `@` is refused); use basic_auth instead",
        ));
    }
    let uri: Uri = base.parse().map_err(|_| invalid("it is not a valid URL"))?;
    let scheme = match uri.scheme_str() {
        Some(s @ ("http" | "https")) => s,
        Some(_) => return Err(invalid("the scheme must be http or https")),
        None => return Err(invalid("the scheme (http:// or https://) is missing")),
    };
    let authority = uri
        .authority()
        .ok_or_else(|| invalid("the host is missing"))?;
    // `http::Uri` does not check the port (`Authority::port` is `None` for one that is not a
    // number): the text after the host's last `:` (not inside an IPv6 address's brackets).
    let port = match authority.as_str().rsplit_once(':') {
        Some((_, port)) if !port.ends_with(']') => Some(port),
        _ => None,
    };
    if port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return Err(invalid("the port is not a number"));
    }
    if uri.query().is_some() {
        return Err(invalid("it must not have a query"));
    }
    if job.is_empty() {
        return Err(PushgatewayConfigError::EmptyJob);
    }
    let prefix = uri.path().trim_end_matches('/');
    let mut url = format!("{scheme}://{authority}{prefix}/metrics");
    push_pair(&mut url, "job", job);
    let mut seen: Vec<&str> = Vec::new();
    for (name, value) in labels {
        if !is_label_name(name) {
            return Err(PushgatewayConfigError::InvalidLabelName { name: name.clone() });
        }
        if seen.contains(&name.as_str()) {
            return Err(PushgatewayConfigError::DuplicateLabel { name: name.clone() });
        }
        seen.push(name);
        push_pair(&mut url, name, value);
    }
    Ok(url)
}

/// `url` with everything between the scheme and its last `@` replaced by `<redacted>`: an error
/// that shows the URL must not show a password, even one holding `/`, `?` or `#` (which would
/// end the authority early if it were read as a URL).
fn without_credentials(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    match url[start..].rfind('@') {
        Some(at) => format!("{}<redacted>@{}", &url[..start], &url[start + at + 1..]),
        None => url.to_owned(),
    }
}

/// The API's list of groups, `<scheme>://<authority><prefix>/api/v1/metrics`, for a base URL
/// that [`grouping_url`] accepted.
pub(super) fn api_url(base: &str) -> String {
    let uri: Uri = base.parse().unwrap_or_default();
    let scheme = uri.scheme_str().unwrap_or("http");
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let prefix = uri.path().trim_end_matches('/');
    format!("{scheme}://{authority}{prefix}/api/v1/metrics")
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
        && name != "job"
}

/// Appends `/<name>/<value>`, or `/<name>@base64/<value as base64url>` when the value is empty,
/// is `.` or `..` (path segments that an HTTP server resolves: the Pushgateway answers such a
/// path with a redirect) or holds anything but URL-unreserved characters (the Pushgateway's own
/// encoding).
fn push_pair(url: &mut String, name: &str, value: &str) {
    let plain = !matches!(value, "" | "." | "..")
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
    url.push('/');
    url.push_str(name);
    if plain {
        url.push('/');
        url.push_str(value);
    } else if value.is_empty() {
        // The Pushgateway's spelling of an empty value.
        url.push_str("@base64/=");
    } else {
        url.push_str("@base64/");
        url.push_str(&base64(value.as_bytes(), URL_SAFE));
    }
}

pub(super) const STANDARD: (&[u8; 64], bool) = (
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
    true,
);
const URL_SAFE: (&[u8; 64], bool) = (
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
    false,
);

/// RFC 4648 base64 with the given alphabet, padded or not.
pub(super) fn base64(input: &[u8], (alphabet, pad): (&[u8; 64], bool)) -> String {
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let sextets = [(n >> 18) & 63, (n >> 12) & 63, (n >> 6) & 63, n & 63];
        for (i, s) in sextets.iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(alphabet[*s as usize]));
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn base64_matches_rfc4648() {
        for (input, padded, url) in [
            ("", "", ""),
            ("f", "Zg==", "Zg"),
            ("fo", "Zm8=", "Zm8"),
            ("foo", "Zm9v", "Zm9v"),
            ("foobar", "Zm9vYmFy", "Zm9vYmFy"),
            ("/var/tmp", "L3Zhci90bXA=", "L3Zhci90bXA"),
            ("\u{ff}\u{fe}", "w7/Dvg==", "w7_Dvg"),
        ] {
            assert_eq!(base64(input.as_bytes(), STANDARD), padded, "{input:?}");
            assert_eq!(base64(input.as_bytes(), URL_SAFE), url, "{input:?}");
        }
    }

    #[test]
    fn grouping_key_is_encoded_the_pushgateway_way() {
        let url = grouping_url(
            "http://127.0.0.1:9091/",
            "batch",
            &labels(&[("instance", "host-1"), ("path", "/var/tmp"), ("empty", "")]),
        )
        .unwrap();
        assert_eq!(
            url,
            "http://127.0.0.1:9091/metrics/job/batch/instance/host-1\
             /path@base64/L3Zhci90bXA/empty@base64/="
        );
        let url = grouping_url(
            "http://gw:80",
            "..",
            &labels(&[("a", "."), ("b", "..."), ("c", "x.y")]),
        )
        .unwrap();
        assert_eq!(
            url,
            "http://gw:80/metrics/job@base64/Li4/a@base64/Lg/b/.../c/x.y"
        );
        let url = grouping_url("http://gw:80/prefix", "a b", &[]).unwrap();
        assert_eq!(url, "http://gw:80/prefix/metrics/job@base64/YSBi");
    }

    #[test]
    fn bad_settings_say_what_to_fix() {
        let err = |base: &str, job: &str, l: &[(&str, &str)]| {
            grouping_url(base, job, &labels(l)).unwrap_err()
        };
        assert!(matches!(
            err("ftp://gw:9091", "j", &[]),
            PushgatewayConfigError::InvalidUrl { .. }
        ));
        assert!(matches!(
            err("gw:9091", "j", &[]),
            PushgatewayConfigError::InvalidUrl { .. }
        ));
        assert!(matches!(
            err("http://gw:9091?x=1", "j", &[]),
            PushgatewayConfigError::InvalidUrl { .. }
        ));
        assert_eq!(
            err("http://gw:9091", "", &[]),
            PushgatewayConfigError::EmptyJob
        );
        for bad in ["job", "__name", "1abc", "a-b", ""] {
            assert_eq!(
                err("http://gw:9091", "j", &[(bad, "v")]),
                PushgatewayConfigError::InvalidLabelName {
                    name: bad.to_owned()
                }
            );
        }
        assert_eq!(
            err("http://gw:9091", "j", &[("a", "1"), ("a", "2")]),
            PushgatewayConfigError::DuplicateLabel {
                name: "a".to_owned()
            }
        );
        assert_eq!(
            without_credentials("http://u:p@ss@gw:1/x"),
            "http://<redacted>@gw:1/x"
        );
        assert_eq!(
            without_credentials("http://u:p/ss?w#d@gw:1/x"),
            "http://<redacted>@gw:1/x"
        );
        assert_eq!(without_credentials("gw:1/a"), "gw:1/a");
        let shown = err("ftp://gw:9091", "j", &[]).to_string();
        assert!(
            shown.contains("the scheme must be http or https"),
            "{shown}"
        );
        assert_eq!(
            grouping_url("https://gw:9091/p", "j", &[]).unwrap(),
            "https://gw:9091/p/metrics/job/j"
        );
    }

    /// A password holding a character that ends an authority (`/`, `?`, `#`), pasted
    /// unencoded: `http::Uri` reads a host of `user` and a "port" of `hun`. Refused, and the
    /// error does not show it.
    #[test]
    fn a_password_ending_the_authority_early_is_refused_and_not_shown() {
        for url in [
            "http://user:hun/ter2@gw:9091",
            "http://user:hun?ter2@gw:9091",
            "http://user:hun#ter2@gw:9091",
            "http://user:hun/ter2@gw:9091/prefix",
            "https://user:ter2@gw:9091",
        ] {
            let e = grouping_url(url, "j", &[]).unwrap_err();
            for shown in [e.to_string(), format!("{e:?}")] {
                assert!(!shown.contains("ter2"), "{url}: {shown}");
                assert!(shown.contains("<redacted>"), "{url}: {shown}");
            }
        }
        // A port that is not a number is refused too.
        let e = grouping_url("http://gw:port/x", "j", &[]).unwrap_err();
        assert!(e.to_string().contains("port"), "{e}");
    }
}

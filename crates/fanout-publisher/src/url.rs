//! fanout's Redis URLs, as the contract writes them, turned into `fred` configs.
//!
//! - `redis://[user:pass@]host:port[/db]` and `rediss://…` — one server.
//! - `redis-cluster://[user:pass@]h1:p1,h2:p2,…` (also `rediss-cluster://`) — Redis
//!   Cluster; any reachable node is enough to discover the rest.
//! - `redis-sentinel://[user:pass@]s1:p1,s2:p2,…/<service>[/db]` (also
//!   `rediss-sentinel://`) — the primary that the sentinels name for `<service>`;
//!   `?sentinelServiceName=<service>` may be used instead of the path segment.
//!
//! The comma-separated host list is what people write; `fred` wants one host plus
//! `node=` query parameters, so the list is rewritten before `fred` parses it.

use fred::types::config::Config;

/// Why a URL was refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UrlError(pub String);

/// Parses one of fanout's Redis URLs (see the module documentation).
pub fn redis_config(url: &str) -> Result<Config, UrlError> {
    Config::from_url(&fred_url(url)?).map_err(|e| UrlError(e.details().to_string()))
}

/// Whether `url` names a Redis Cluster.
pub fn is_cluster_url(url: &str) -> bool {
    matches!(scheme(url), Some("redis-cluster" | "rediss-cluster"))
}

fn scheme(url: &str) -> Option<&str> {
    url.split_once("://").map(|(s, _)| s)
}

/// The URL in the form `fred` parses.
fn fred_url(url: &str) -> Result<String, UrlError> {
    let url = url.trim();
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(UrlError(format!(
            "`{url}` is not a URL: expected redis://, rediss://, redis-cluster:// or redis-sentinel://"
        )));
    };
    let sentinel = match scheme {
        "redis" | "rediss" => return Ok(url.to_string()),
        "redis-cluster" | "rediss-cluster" => false,
        "redis-sentinel" | "rediss-sentinel" => true,
        other => {
            return Err(UrlError(format!(
            "`{other}://` is not one of redis://, rediss://, redis-cluster://, redis-sentinel://"
        )))
        }
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, p),
        None => (rest, ""),
    };
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let mut hosts = hosts.split(',').map(str::trim).filter(|h| !h.is_empty());
    let Some(first) = hosts.next() else {
        return Err(UrlError(format!(
            "`{scheme}://` needs at least one host:port"
        )));
    };
    let mut params: Vec<String> = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    params.extend(hosts.map(|h| format!("node={h}")));
    let mut path_out = String::new();
    if sentinel {
        // `/<service>[/db]`: a non-numeric first segment is the service name.
        let mut segments = path.split('/').filter(|s| !s.is_empty());
        match segments.next() {
            Some(db) if db.parse::<u8>().is_ok() => path_out = format!("/{db}"),
            Some(service) => {
                params.push(format!("sentinelServiceName={service}"));
                if let Some(db) = segments.next() {
                    path_out = format!("/{db}");
                }
            }
            None => {}
        }
        if !params.iter().any(|p| p.starts_with("sentinelServiceName=")) {
            return Err(UrlError(format!(
                "`{scheme}://` needs the service name: {scheme}://host:port,host:port/<service>"
            )));
        }
    } else if !path.is_empty() {
        return Err(UrlError(format!(
            "`{scheme}://` takes no path (Redis Cluster has one database)"
        )));
    }
    let mut out = format!("{scheme}://");
    if let Some(u) = userinfo {
        out.push_str(u);
        out.push('@');
    }
    out.push_str(first);
    out.push_str(&path_out);
    if !params.is_empty() {
        out.push('?');
        out.push_str(&params.join("&"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fred::types::config::ServerConfig;

    #[test]
    fn cluster_host_lists_become_nodes() {
        let config = redis_config("redis-cluster://a:7000, b:7001,c:7002").unwrap();
        let ServerConfig::Clustered { hosts, .. } = config.server else {
            panic!("not clustered: {:?}", config.server);
        };
        let mut hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        hosts.sort();
        assert_eq!(hosts, ["a:7000", "b:7001", "c:7002"]);
        assert!(is_cluster_url("redis-cluster://a:1"));
        assert!(!is_cluster_url("redis://a:1"));
    }

    #[test]
    fn cluster_credentials_are_kept() {
        let config = redis_config("redis-cluster://u:p@a:7000,b:7001").unwrap();
        assert_eq!(config.username.as_deref(), Some("u"));
        assert_eq!(config.password.as_deref(), Some("p"));
    }

    #[test]
    fn sentinel_service_from_the_path() {
        let config = redis_config("redis-sentinel://s1:26379,s2:26380/mymaster/2").unwrap();
        let ServerConfig::Sentinel {
            hosts,
            service_name,
            ..
        } = config.server
        else {
            panic!("not sentinel: {:?}", config.server);
        };
        assert_eq!(service_name, "mymaster");
        assert_eq!(hosts.len(), 2);
        assert_eq!(config.database, Some(2));
        let config = redis_config("redis-sentinel://s1:26379?sentinelServiceName=m").unwrap();
        assert!(
            matches!(config.server, ServerConfig::Sentinel { ref service_name, .. } if service_name == "m")
        );
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        let e = redis_config("redis-sentinel://s1:26379")
            .unwrap_err()
            .to_string();
        assert!(e.contains("service name"), "{e}");
        let e = redis_config("http://x").unwrap_err().to_string();
        assert!(e.contains("not one of"), "{e}");
        let e = redis_config("redis-cluster://").unwrap_err().to_string();
        assert!(e.contains("at least one host"), "{e}");
        let e = redis_config("redis-cluster://a:1/3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no path"), "{e}");
        assert!(redis_config("redis://127.0.0.1:6380/1").is_ok());
    }
}

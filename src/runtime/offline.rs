//! `icp-gate check` and `icp-gate explain`: what the proxy would do with a config, answered
//! without starting it.

use std::net::IpAddr;
use std::path::Path;

use crate::config::Config;
use crate::core::decision::{HostInput, Policy, decide};
use crate::core::routes::RouteTable;
use crate::proxy::state::Generation;
use crate::registry;
use crate::runtime::process::Error;
use crate::wire::host;

/// `icp-gate check`: loads and validates a config and everything it names (block page, TLS
/// files, the registry state or seed) as a start would, and summarises it.
pub fn check(path: &Path) -> Result<String, Error> {
    let config = Config::load(path)?;
    Generation::new(config.clone())?;
    if let Some(admin) = &config.admin {
        // The token files and the admin TLS files, read as a start (or a reload) would.
        crate::admin::AdminAuth::load(admin)?;
    }
    let snapshot = registry::inspect(&config.registry)?;
    Ok(format!(
        "{}: ok (listeners: {}, routes: {}, registry: revision {}, {} entries)",
        path.display(),
        config.listeners.len(),
        config.routes.len(),
        snapshot.revision(),
        snapshot.len()
    ))
}

/// `icp-gate explain`: the decision the proxy would take for `raw_host` at `dst`, through the
/// same [`decide`] the listeners call, as lines of text.
pub fn explain(path: &Path, raw_host: &str, dst: Option<IpAddr>) -> Result<String, Error> {
    let config = Config::load(path)?;
    let snapshot = registry::inspect(&config.registry)?;
    let policy = Policy::new(RouteTable::new(config.routes.clone()), &config.policy);
    // The destination decides the route, and so the rules: never guessed between routes.
    let (dst, assumed) = match (dst, config.routes.as_slice()) {
        (Some(ip), _) => (ip, ""),
        (None, [only]) => (
            only.dst.network(),
            " (assumed: the only route's network address; --dst names another)",
        ),
        (None, routes) => {
            let prefixes: Vec<String> = routes.iter().map(|r| r.dst.to_string()).collect();
            return Err(format!(
                "{}: --dst is required: the config has {} routes ({}), and the address the \
                 client connected to decides which applies",
                path.display(),
                routes.len(),
                prefixes.join(", ")
            )
            .into());
        }
    };
    let parsed = host::parse_authority(raw_host.as_bytes());
    let input = HostInput::typed(raw_host, &parsed);
    let v = decide(dst, input, &snapshot, &policy);
    let host_line = match &parsed {
        Ok(h) => h.to_text().into_owned(),
        Err(e) => format!("{raw_host:?} ({e})"),
    };
    let route = v.route.map_or("none".to_string(), |r| {
        let mode = r.mode.unwrap_or(policy.mode);
        format!(
            "{} ({}, {}{})",
            r.dst,
            if r.mainland {
                "mainland"
            } else {
                "not mainland"
            },
            mode.as_str(),
            // Shown only where it is waived: it is what turns not_accessed into filed_elsewhere.
            if r.require_access_here {
                ""
            } else {
                ", require_access_here = false"
            }
        )
    });
    let matched = v.matched.map_or("-".to_string(), |e| {
        format!(
            "{} ({}, {}, access_here={})",
            e.domain,
            e.icp,
            e.status.as_str(),
            e.access_here
        )
    });
    Ok(format!(
        "host:        {host_line}\n\
         destination: {dst}{assumed}\n\
         route:       {route}\n\
         decision:    {}\n\
         reason:      {}\n\
         matched:     {matched}\n\
         registrable: {}\n",
        v.decision.as_str(),
        v.reason.as_str(),
        v.registrable.unwrap_or("-"),
    ))
}

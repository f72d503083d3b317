//! The open-file limit, raised to what `limits.max_connections` needs.

use tracing::{info, warn};

/// Descriptors beyond two per connection: listening sockets, runtimes, the registry's files.
const SPARE_DESCRIPTORS: u64 = 256;

/// Makes room for `max_connections` (two descriptors each: client and origin) by raising the
/// open-file soft limit towards the hard limit, at start and at reload, as HAProxy does for
/// `maxconn`; warns when the hard limit is too low. Past the limit, accepts would fail with "too
/// many open files" long before the configured count.
#[allow(unsafe_code)]
pub(super) fn fit_descriptor_limit(max_connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes only the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let needed = (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(SPARE_DESCRIPTORS);
    if limit.rlim_cur < needed && limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: needed.min(limit.rlim_max),
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit(2) only reads the struct it is given; raising the soft limit up to
        // the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            info!(
                from = limit.rlim_cur,
                to = raised.rlim_cur,
                "raised the open-file limit"
            );
            limit = raised;
        }
    }
    if limit.rlim_cur < needed {
        warn!(
            open_files = limit.rlim_cur,
            needed,
            "the open-file limit is below 2 × limits.max_connections + {SPARE_DESCRIPTORS}; \
             raise its hard limit (LimitNOFILE=, ulimit -Hn) or lower limits.max_connections"
        );
    }
}

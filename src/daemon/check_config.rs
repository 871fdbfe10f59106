//! `--check-config`: loads the configuration as start-up does, checks every route, and prints
//! each route with the allowlist entries it relies on (standard output) and every problem
//! (standard error). Binds nothing, changes nothing; the exit status is 0 or 2.
//!
//! Imports [`crate::daemon::startup`] (load, the route check) and [`crate::daemon::settings`].

use std::fmt::Write as _;
use std::path::Path;

use crate::config::cli::Options;
use crate::daemon::settings::Settings as DaemonSettings;
use crate::daemon::startup::{self, check_route_in, Fatal, Loaded, Metadata, Reliance, Routes};
use crate::policy::dns::Dns;
use crate::proxy::route::{Destination, Settings};

/// `--check-config`: prints the effective routes and the entries each relies on to standard
/// output, problems to standard error; returns the exit status (0 or 2). Binds nothing.
pub async fn check_config(options: &Options) -> u8 {
    let path = &options.config;
    let mut metadata = Metadata::new(options.imds_endpoint);
    let loaded = match startup::load(options, &mut metadata, Routes::Optional).await {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("{}", e.message());
            eprintln!("{}: configuration NOT OK", path.display());
            return 2;
        }
    };
    let mut warnings = loaded.warnings.clone();
    warnings.extend(enclaves_command_warning(options, &loaded).await);
    if loaded.routes.is_empty() {
        // The file alone: no route to check, so no resolver is needed either.
        for w in &warnings {
            eprintln!("warning: {w}");
        }
        print!("{}{}", summary(path, &loaded), enclaves(&loaded));
        return verdict(path, 0, warnings.len());
    }
    let settings = DaemonSettings::from_options(options, &loaded.config);
    let dns = match Dns::new(&settings.dns) {
        Ok(dns) => dns,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let mut out = summary(path, &loaded);
    let mut problems = 0;
    for route in &loaded.routes {
        if !report_route(&mut out, &loaded, &dns, route, path).await {
            problems += 1;
        }
    }
    out.push_str(&enclaves(&loaded));
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    print!("{out}");
    verdict(path, problems, warnings.len())
}

/// With entries that match by name, PCR or debug: runs `--enclaves-command` once, as start-up
/// would. A failure is a warning (the daemon would start, with those matches failing closed).
async fn enclaves_command_warning(options: &Options, loaded: &Loaded) -> Option<String> {
    if !loaded.policies.needs_table() {
        return None;
    }
    let identity = crate::proxy::identity::Identity::new(&options.enclaves_command);
    match identity.run_once().await {
        crate::proxy::identity::Run::Ok(n) => {
            println!(
                "--enclaves-command ({}) lists {n} running enclave{}",
                options.enclaves_command,
                if n == 1 { "" } else { "s" }
            );
            None
        }
        run => Some(format!(
            "--enclaves-command ({}) {}: `enclaves:` entries that match by name, pcr0-2 or \
             debug would match nothing until it works (cid and source still match)",
            options.enclaves_command, run
        )),
    }
}

/// One line per `enclaves:` entry: what it matches, its allowlist, and the routes its peers
/// may use (every route without `enclaves:`, and those that list it).
fn enclaves(loaded: &Loaded) -> String {
    let mut out = String::new();
    for (index, (id, matcher, entries)) in loaded.policies.entries().enumerate() {
        let line = loaded
            .config
            .enclave_lines
            .get(index)
            .copied()
            .flatten()
            .map_or_else(String::new, |l| format!(", line {l}"));
        let routes: Vec<String> = loaded
            .routes
            .iter()
            .filter(|r| !matches!(r.destination, Destination::Ingress(_)))
            .filter(|r| {
                r.spec
                    .enclaves
                    .as_ref()
                    .is_none_or(|ids| ids.iter().any(|i| i == id))
            })
            .map(|r| r.spec.listen.to_string())
            .collect();
        let routes = if routes.is_empty() {
            "no route".to_owned()
        } else {
            routes.join(", ")
        };
        let _ = writeln!(
            out,
            "enclave {id} (enclaves[{index}]{line}): matches {matcher}; {entries} allowlist \
             entr{} beside the top-level allowlist; may use {routes}",
            if entries == 1 { "y" } else { "ies" }
        );
    }
    out
}

/// The first line: the file, how many routes and allowlist entries. With no route at all (no
/// positional route, no `routes:`), the file is checked alone, as `nginx -t` does.
fn summary(path: &Path, loaded: &Loaded) -> String {
    let n = loaded.routes.len();
    let entries = loaded.policy.entries().len();
    let entries = format!(
        "{entries} allowlist entr{}",
        if entries == 1 { "y" } else { "ies" }
    );
    if n == 0 {
        return format!(
            "{}: {entries}, no route: the file is checked alone (to check a route too, give \
             LISTEN REMOTE_ADDR REMOTE_PORT or add `routes:`)\n",
            path.display()
        );
    }
    format!(
        "{}: {n} route{}, {entries}\n",
        path.display(),
        if n == 1 { "" } else { "s" },
    )
}

/// Appends `route`'s lines to `out`: the route and its limits, then the entries it relies on or
/// why it is not allowed (the error itself goes to standard error). `false` for a problem.
async fn report_route(
    out: &mut String,
    loaded: &Loaded,
    dns: &Dns,
    route: &Settings,
    path: &Path,
) -> bool {
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "route {route} ({}{})",
        route.spec.origin,
        limits(route)
    );
    match check_route_in(&loaded.policies, dns, route, path).await {
        Ok(reliance) => {
            report_reliance(out, loaded, route, reliance);
            true
        }
        Err(e) => {
            let verdict = match e {
                Fatal::Config(_) => "NOT ALLOWED",
                // DNS could not answer for a remote only DNS can vouch for.
                Fatal::Runtime(_) => "NOT CHECKED (DNS did not answer; see the error)",
            };
            let _ = writeln!(out, "  {verdict}");
            eprintln!("{}", e.message());
            false
        }
    }
}

/// `, max_connections N, idle_timeout D` for the limits `route` sets, or nothing.
fn limits(route: &Settings) -> String {
    let mut limits = Vec::new();
    if let Some(max) = route.max_connections {
        limits.push(format!("max_connections {max}"));
    }
    if let Some(idle) = route.idle_timeout {
        limits.push(format!("idle_timeout {}", humantime::format_duration(idle)));
    }
    if limits.is_empty() {
        String::new()
    } else {
        format!(", {}", limits.join(", "))
    }
}

/// One line per allowlist entry `route` relies on, with its index and line in the file.
fn report_reliance(out: &mut String, loaded: &Loaded, route: &Settings, reliance: Reliance) {
    let how = if reliance.via_dns {
        "allowed through the current DNS answers of"
    } else if matches!(route.destination, Destination::Fixed { .. }) {
        "allowed by"
    } else if matches!(route.destination, Destination::Dns) {
        "answers the names allowed by"
    } else {
        "may reach, per connection,"
    };
    if let Some((index, id)) = &reliance.enclave {
        let _ = writeln!(
            out,
            "  {how} the allowlist of enclave {id} (enclaves[{index}]): only its peers reach it"
        );
    }
    if let Some(ids) = &route.spec.enclaves {
        let _ = writeln!(out, "  only for the enclaves {}", ids.join(", "));
    }
    for index in reliance.entries {
        let Some(entry) = loaded.policy.entries().get(index) else {
            // The indexes come from this policy; one out of range would be a bug, not worth a
            // panic in a report.
            continue;
        };
        let line = loaded
            .config
            .allowlist_lines
            .get(index)
            .copied()
            .flatten()
            .map_or_else(String::new, |l| format!(", line {l}"));
        let _ = writeln!(out, "  {how} {entry} (allowlist[{index}]{line})");
    }
}

/// The last line, and the exit status: 0 when every route is allowed, else 2.
/// Warnings (entries that add nothing) are counted on the OK line; they do not make it NOT OK.
fn verdict(path: &Path, problems: usize, warnings: usize) -> u8 {
    if problems == 0 {
        if warnings == 0 {
            println!("{}: configuration OK", path.display());
        } else {
            println!(
                "{}: configuration OK, with {warnings} warning{} (on standard error)",
                path.display(),
                if warnings == 1 { "" } else { "s" }
            );
        }
        0
    } else {
        println!(
            "{}: configuration NOT OK: {problems} route{} not allowed or not checked",
            path.display(),
            if problems == 1 { "" } else { "s" }
        );
        2
    }
}

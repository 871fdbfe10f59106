//! The house's rules, checked on the source: the folders of `src/` are layers, each importing
//! only from the ones below it; no two modules import each other, directly or round a circle;
//! and the library as enclave-app builds it (without the `daemon` feature) brings none of the
//! daemon's heavy crates.
//!
//! Imports are read from code, not comments: every `crate::a::b` path outside `//` comments and
//! outside `#[cfg(test)]` modules (a unit test may use a layer above to build its input), with
//! `use crate::{...}` groups expanded. A path names the deepest module that exists; a path to a
//! folder's own re-export (`crate::policy::Policy`) counts for the folder only.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The folders, bottom first: each may import from those before it and itself.
const LAYERS: &[&str] = &["net", "ops", "policy", "config", "proxy", "daemon"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/proxy/request/sni.rs` → `proxy::request::sni`; `src/policy/mod.rs` → `policy`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .filter(|p| p != "mod")
        .collect();
    parts.join("::")
}

/// The code of a file without comments and without its `#[cfg(test)]` module.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `crate::...` path in `code`, groups expanded: `crate::{a::b, c}` gives `a::b` and `c`.
fn crate_paths(code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().last();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `nitro_vsock_proxy_crate::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                paths.push(path_prefix(item.trim()));
            }
        } else {
            paths.push(path_prefix(rest));
        }
    }
    paths
}

/// Every `super::...` path in `code` (groups expanded), as written.
fn super_paths(code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    for (at, _) in code.match_indices("super::") {
        if code[..at].ends_with("super::") {
            continue; // the rest of a `super::super::` already taken
        }
        if code[..at]
            .chars()
            .last()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
        {
            continue;
        }
        let rest = &code[at..];
        let supers = rest
            .matches("super::")
            .count()
            .min(rest.split("super::").take_while(|p| p.is_empty()).count());
        let after = &rest["super::".len() * supers..];
        let head = "super::".repeat(supers);
        if let Some(group) = after.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                paths.push(format!("{head}{}", path_prefix(item.trim())));
            }
        } else {
            paths.push(format!("{head}{}", path_prefix(after)));
        }
    }
    paths
}

fn path_prefix(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
        .collect::<String>()
        .trim_end_matches(':')
        .to_owned()
}

/// The deepest module in `modules` that `path` names, looking through folders' re-exports
/// (`policy::Policy` is `policy::decision`'s).
fn resolve<'a>(
    path: &str,
    modules: &'a BTreeSet<String>,
    reexports: &'a BTreeMap<String, String>,
) -> Option<&'a String> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len()).rev().find_map(|n| {
        let prefix = parts[..n].join("::");
        reexports.get(&prefix).or_else(|| modules.get(&prefix))
    })
}

/// `super::x` in `module` as a path from the crate (each `super` is one module up, a folder's
/// mod.rs being the folder's module).
fn absolute(path: &str, module: &str) -> String {
    let mut base: Vec<&str> = module.split("::").filter(|p| !p.is_empty()).collect();
    let mut rest = path;
    while let Some(r) = rest.strip_prefix("super::") {
        base.pop();
        rest = r;
    }
    base.push(rest);
    base.join("::")
}

/// `pub use child::{A, B};` in a folder's mod.rs: `folder::A` → `folder::child`.
fn reexports_of(folder: &str, code: &str, modules: &BTreeSet<String>) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for statement in code.split(';') {
        let Some(used) = statement.trim().strip_prefix("pub use ") else {
            continue;
        };
        let used = used
            .trim()
            .strip_prefix("crate::")
            .map_or_else(|| format!("{folder}::{}", used.trim()), str::to_owned);
        let (head, names) = match used.split_once("::{") {
            Some((head, group)) => (head.to_owned(), group.trim_end_matches('}').to_owned()),
            None => match used.rsplit_once("::") {
                Some((head, name)) => (head.to_owned(), name.to_owned()),
                None => continue,
            },
        };
        if let Some(target) = (1..=head.split("::").count()).rev().find_map(|n| {
            let prefix = head.split("::").take(n).collect::<Vec<_>>().join("::");
            modules.get(&prefix).cloned()
        }) {
            for name in names.split(',') {
                let name = name.trim().split(" as ").last().unwrap_or("").trim();
                if !name.is_empty() {
                    found.push((format!("{folder}::{name}"), target.clone()));
                }
            }
        }
    }
    found
}

fn layer_of(module: &str) -> Option<usize> {
    let top = module.split("::").next()?;
    LAYERS.iter().position(|l| *l == top)
}

struct Graph {
    /// module → the modules it imports (other than itself and its own folder's re-exports).
    edges: BTreeMap<String, BTreeSet<String>>,
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
    let is_folder = |f: &Path| f.file_name().is_some_and(|n| n == "mod.rs");
    let mut reexports = BTreeMap::new();
    for file in files.iter().filter(|f| is_folder(f)) {
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        reexports.extend(reexports_of(&module_of(&src, file), &code, &modules));
    }
    let mut edges = BTreeMap::new();
    for file in &files {
        let module = module_of(&src, file);
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let mut imports = BTreeSet::new();
        let supers = super_paths(&code)
            .into_iter()
            .map(|p| absolute(&p, &module));
        for path in crate_paths(&code).into_iter().chain(supers) {
            if let Some(target) = resolve(&path, &modules, &reexports) {
                // A folder's mod.rs declares and re-exports its children; a child that names its
                // folder's re-export depends on a sibling, which the folder rule covers.
                let is_own_folder = module.starts_with(&format!("{target}::"));
                if *target != module && !is_own_folder && !target.is_empty() {
                    imports.insert(target.clone());
                }
            }
        }
        edges.insert(module, imports);
    }
    Graph { edges }
}

#[test]
fn every_folder_imports_only_from_the_folders_below_it() {
    let graph = graph();
    let mut violations = Vec::new();
    for (module, imports) in &graph.edges {
        let Some(own) = layer_of(module) else {
            continue; // lib.rs and main.rs sit above every folder
        };
        for target in imports {
            match layer_of(target) {
                Some(layer) if layer <= own => {}
                _ => violations.push(format!("{module} imports {target}")),
            }
        }
    }
    assert!(
        violations.is_empty(),
        "imports against the layers {LAYERS:?} (bottom first):\n{}",
        violations.join("\n")
    );
    // The walk sees real imports: the daemon imports the proxy, the proxy the policy.
    assert!(graph.edges["daemon::run"]
        .iter()
        .any(|t| t.starts_with("proxy")));
    assert!(graph.edges["proxy::upstream"]
        .iter()
        .any(|t| t.starts_with("policy")));
}

#[test]
fn no_module_imports_another_that_imports_it_back_round_any_circle() {
    let graph = graph();
    // Depth-first search for a back edge; the circle is reported whole.
    fn visit<'a>(
        node: &'a str,
        graph: &'a Graph,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| *n == node) {
            let mut circle: Vec<String> = path[at..].iter().map(|s| s.to_string()).collect();
            circle.push(node.to_owned());
            return Some(circle);
        }
        if !done.insert(node) {
            return None;
        }
        path.push(node);
        for next in graph.edges.get(node).into_iter().flatten() {
            if let Some(circle) = visit(next, graph, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for module in graph.edges.keys() {
        let mut path = Vec::new();
        if let Some(circle) = visit(module, &graph, &mut path, &mut done) {
            panic!("import circle: {}", circle.join(" -> "));
        }
    }
}

#[test]
fn the_walk_reads_paths_groups_supers_and_reexports() {
    // The checker itself, on made-up code: a test that could never fail would prove nothing.
    let code = "use crate::{net::relay, ops::audit};\nlet x = crate::policy::host::Host::parse(s); // crate::daemon\n";
    assert_eq!(
        crate_paths(&code_of(code)),
        vec!["net::relay", "ops::audit", "policy::host::Host::parse"]
    );
    let modules: BTreeSet<String> = ["policy", "policy::host", "policy::decision"]
        .map(String::from)
        .into();
    let reexports: BTreeMap<String, String> =
        reexports_of("policy", "pub use decision::{Policy, Denial};\n", &modules)
            .into_iter()
            .collect();
    assert_eq!(
        resolve("policy::host::Host::parse", &modules, &reexports).map(String::as_str),
        Some("policy::host")
    );
    assert_eq!(
        resolve("policy::Policy", &modules, &reexports).map(String::as_str),
        Some("policy::decision")
    );
    assert_eq!(
        absolute("super::ConfigError", "config::read"),
        "config::ConfigError"
    );
    assert_eq!(
        super_paths("use super::{a, b::C};"),
        vec!["super::a", "super::b::C"]
    );
}

#[test]
fn the_library_as_enclave_app_builds_it_has_none_of_the_daemons_crates() {
    let output = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-p",
            "nitro-vsock-proxy",
            "--no-default-features",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    let tree = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && tree.contains("tokio-vsock"),
        "cargo tree failed: {}{tree}",
        String::from_utf8_lossy(&output.stderr)
    );
    for heavy in [
        "hickory-resolver",
        "hyper ",
        "prometheus-client",
        "serde_yaml",
    ] {
        assert!(
            !tree.lines().any(|l| l.starts_with(heavy)),
            "{heavy} is in the library built without the daemon feature:\n{tree}"
        );
    }
}

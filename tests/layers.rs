//! Imports only go down: data flows ingress -> intake -> dispatch -> egress,
//! and each top-level module of `src/` may use only modules of a lower layer
//! (its own `crate::` paths outside `#[cfg(test)]` code). A new module must
//! be placed in a layer here; an import that goes up or sideways fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Bottom first.
const LAYERS: &[&[&str]] = &[
    // shared plain data and helpers
    &["utc", "settings"],
    &["push", "stats", "lifecycle"],
    // the wire codec, the accept loop, pure decisions, stores
    &["wire", "net", "router", "redis_conn", "auth", "tls_client"],
    &["registry", "receipts"],
    // egress: the embedded broker, then what hangs off its events
    &["mqtt"],
    &["status", "offline"],
    &["external"],
    &["publisher"],
    &["apns"],
    // dispatch, intake, ingress
    &["dispatch"],
    &["intake"],
    &["proxy", "http"],
    // the wiring
    &["server"],
    // test and tool hooks
    &["fuzzing"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// Top-level module -> the top-level modules its non-test code names.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).unwrap();
            let top = rel.iter().next().unwrap().to_str().unwrap();
            let top = top.trim_end_matches(".rs").to_string();
            if top == "lib" || top == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = match text.find("#[cfg(test)]\nmod tests") {
                Some(i) => &text[..i],
                None => &text,
            };
            let used = graph.entry(top.clone()).or_default();
            for (i, _) in code.match_indices("crate::") {
                let name: String = code[i + 7..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if name != top && !name.is_empty() {
                    used.insert(name);
                }
            }
        }
    }
    graph
}

#[test]
fn imports_only_go_down() {
    let graph = imports();
    let mut wrong = Vec::new();
    for (module, used) in &graph {
        let Some(from) = layer_of(module) else {
            wrong.push(format!("src/{module} is in no layer of tests/layers.rs"));
            continue;
        };
        for target in used {
            match layer_of(target) {
                Some(to) if to < from => {}
                _ => wrong.push(format!("{module} (layer {from}) uses {target}")),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that do not go down:\n  {}\nthe graph: {graph:#?}",
        wrong.join("\n  ")
    );
}

#[test]
fn the_checker_sees_an_upward_import() {
    // `dispatch` drives the senders: it must show up as using `apns`, or the
    // check above proves nothing.
    let graph = imports();
    assert!(graph["dispatch"].contains("apns"), "{graph:#?}");
    assert!(layer_of("dispatch") > layer_of("apns"));
}

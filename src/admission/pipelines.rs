//! Finding a pipeline spec by its `name` among the `*.toml` files of a directory (the workers'
//! `[pipelines] dir`), for triggers that carry no spec text. Files are read on every look, so a
//! spec added or changed there counts from the next trigger on, without a restart.

use std::path::{Path, PathBuf};

use crate::model::spec::PipelineSpec;

/// A spec found by name, with the file it came from.
#[derive(Debug, Clone)]
pub struct FoundSpec {
    pub spec: PipelineSpec,
    pub path: PathBuf,
}

/// Why no spec was found: the reason names the directory, the pipelines it has and the files that
/// do not parse (so a typo in a spec explains a "missing" pipeline).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct NotFound(pub String);

/// The names of the pipelines `dir/*.toml` defines (files that do not parse are left out; an
/// unreadable directory has none).
pub fn names(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml") && path.is_file())
        .filter_map(|path| PipelineSpec::load(&path).ok().map(|spec| spec.name))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The spec in `dir/*.toml` whose `name` is `name`. Two files with that name are an error too.
pub fn find(dir: &Path, name: &str) -> Result<FoundSpec, NotFound> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        NotFound(format!(
            "no pipeline named `{name}`: the pipelines directory {} cannot be read ({e})",
            dir.display()
        ))
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml") && path.is_file())
        .collect();
    paths.sort();
    let mut known = Vec::new();
    let mut unreadable = Vec::new();
    let mut found: Vec<FoundSpec> = Vec::new();
    for path in paths {
        match PipelineSpec::load(&path) {
            Ok(spec) if spec.name == name => found.push(FoundSpec { spec, path }),
            Ok(spec) => known.push(spec.name),
            Err(error) => unreadable.push(error.to_string()),
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => {
            known.sort();
            let known = if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            };
            let mut reason = format!("no pipeline named `{name}` in {} (known: {known})", dir.display());
            if !unreadable.is_empty() {
                reason.push_str(&format!("; files that do not parse: {}", unreadable.join("; ")));
            }
            Err(NotFound(reason))
        }
        _ => Err(NotFound(format!(
            "pipeline `{name}` is defined more than once in {}: {}",
            dir.display(),
            found
                .iter()
                .map(|f| f.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
name = "NAME"
[gallery]
id = "/subscriptions/11111111-1111-4111-8111-111111111111/resourceGroups/rg/providers/Microsoft.Compute/galleries/g"
[definition]
name = "d"
os_type = "Linux"
publisher = "p"
offer = "o"
sku = "s"
[version]
scheme = "existing"
value = "1.0.0"
[[pools]]
target = "t"
account = "/subscriptions/22222222-2222-4222-8222-222222222222/resourceGroups/rg/providers/Microsoft.Batch/batchAccounts/a"
vm_size = "Standard_D2s_v5"
dedicated_nodes = 2
node_agent_sku_id = "batch.node.ubuntu 22.04"
"#;

    fn write(dir: &Path, file: &str, name: &str) {
        std::fs::write(dir.join(file), SPEC.replace("NAME", name)).unwrap();
    }

    #[test]
    fn a_spec_is_found_by_its_name_not_its_file_name() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.toml", "alpha");
        write(dir.path(), "b.toml", "beta");
        std::fs::write(dir.path().join("notes.txt"), "name = \"gamma\"").unwrap();
        let found = find(dir.path(), "beta").unwrap();
        assert_eq!(found.spec.name, "beta");
        assert_eq!(found.path, dir.path().join("b.toml"));
    }

    #[test]
    fn an_unknown_name_lists_the_known_ones_and_the_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.toml", "alpha");
        write(dir.path(), "b.toml", "beta");
        std::fs::write(dir.path().join("broken.toml"), "name = \"gamma\"\nsurprise = 1\n").unwrap();
        let NotFound(reason) = find(dir.path(), "gamma").unwrap_err();
        assert!(reason.contains("no pipeline named `gamma`"), "{reason}");
        assert!(reason.contains("known: alpha, beta"), "{reason}");
        assert!(reason.contains("broken.toml"), "{reason}");

        let NotFound(reason) = find(&dir.path().join("missing"), "alpha").unwrap_err();
        assert!(reason.contains("cannot be read"), "{reason}");

        write(dir.path(), "c.toml", "alpha");
        let NotFound(reason) = find(dir.path(), "alpha").unwrap_err();
        assert!(reason.contains("more than once"), "{reason}");
    }
}

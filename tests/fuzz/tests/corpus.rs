//! Runs every stored fuzz input once through its target's body: the seed corpora
//! committed under `fuzz/corpus/<target>/`, and any crash reproducer kept there after a
//! fix. A panic here is a regression of something fuzzing once found (or a seed that
//! never worked).

use std::path::PathBuf;

use taskgate_fuzz_bodies::TARGETS;

fn corpus_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

#[test]
fn every_stored_input_passes_its_target() {
    let root = corpus_root();
    let mut total = 0;
    for target in TARGETS {
        let dir = root.join(target.name);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (every target needs a seed corpus)", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{} holds no input", dir.display());
        for f in &files {
            let data = std::fs::read(f).unwrap();
            let outcome = std::panic::catch_unwind(|| (target.body)(&data));
            assert!(outcome.is_ok(), "{} fails on {}", target.name, f.display());
        }
        total += files.len();
    }
    assert!(total >= TARGETS.len());
}

#[test]
fn every_corpus_directory_belongs_to_a_target() {
    for entry in std::fs::read_dir(corpus_root()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            TARGETS.iter().any(|t| t.name == name),
            "fuzz/corpus/{name} has no target in tests/fuzz/src/lib.rs"
        );
    }
}

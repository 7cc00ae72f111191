//! `crds/` and the chart's CRD are exactly what `high-templar-operator crd` prints.

#[test]
fn crd_file_matches_the_generated_crd() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let path = format!("{root}/crds/hightemplar.io_hightemplars.yaml");
    let on_disk = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let generated = high_templar_operator::crd_yaml();
    assert!(
        on_disk == generated,
        "{path} is stale: regenerate it with `cargo run -p high-templar-operator -- crd > crds/hightemplar.io_hightemplars.yaml`"
    );
}

#[test]
fn the_binary_prints_the_same_crd() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_high-templar-operator"))
        .arg("crd")
        .output()
        .expect("run the operator binary");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), high_templar_operator::crd_yaml());
}

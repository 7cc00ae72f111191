//! The OCI images of `images/build.sh` against the Dockerfiles: both
//! describe the same image (base, user, entrypoint, cmd, exposed port, the
//! copied binary), the build is reproducible (two builds, same digests, same
//! bytes), the layer holds only the binary, the libraries `ldd` lists, CA
//! certificates and passwd/group (no shell), and the binary runs from the
//! extracted layer as 65532.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use high_templar_e2e::repo_root;
use serde_json::Value;

/// The images, with their Dockerfile and the default command.
const IMAGES: [(&str, &str); 2] = [("gateway", "serve"), ("operator", "run")];

/// The base image of both Dockerfiles' runtime stage: `images/build.sh` puts
/// in the layer what this base provides to the binary.
const DISTROLESS: &str = "gcr.io/distroless/cc-debian12:nonroot";

fn name(image: &str) -> String {
    format!("high-templar-{image}")
}

/// `target/release`, next to the profile directory of this test executable.
fn release_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/release
    exe.parent().and_then(Path::parent).and_then(Path::parent).expect("target dir").join("release")
}

fn release_binary(image: &str) -> PathBuf {
    let path = release_dir().join(name(image));
    assert!(
        path.exists(),
        "{} not built: run `cargo build --release --locked -p high-templar-gateway -p high-templar-operator` \
         first (tests/run does)",
        path.display()
    );
    path
}

fn run(command: &mut Command) -> Output {
    let output = command.output().unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn build_script() -> Command {
    let mut command = Command::new(repo_root().join("images/build.sh"));
    command.env_remove("SOURCE_DATE_EPOCH");
    command
}

/// One run of `images/build.sh` for both images into `dir`; its stdout.
fn build_into(dir: &Path) -> String {
    let _ = std::fs::remove_dir_all(dir);
    for (image, _) in IMAGES {
        release_binary(image);
    }
    let output = run(build_script()
        .arg("--bin-dir")
        .arg(release_dir())
        .arg("--out")
        .arg(dir)
        .arg("--revision")
        .arg("0123456789abcdef0123456789abcdef01234567"));
    String::from_utf8(output.stdout).expect("utf-8 output")
}

/// An image archive, unpacked.
struct Image {
    /// The archive's bytes.
    archive: Vec<u8>,
    /// `index.json`.
    index: Value,
    manifest_digest: String,
    /// The config blob.
    config: Value,
    /// `path → (mode string, uid/gid)` of every layer entry, without the
    /// trailing `/` of directories.
    entries: BTreeMap<String, (String, String)>,
    /// The layer's entry paths in archive order.
    order: Vec<String>,
    /// The layer extracted.
    root: PathBuf,
}

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let path = layout.join("blobs/sha256").join(hex);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let sum = run(Command::new("sha256sum").arg(&path));
    assert!(String::from_utf8_lossy(&sum.stdout).starts_with(hex), "blob {digest} does not hash to its name");
    bytes
}

fn json(bytes: &[u8], what: &str) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("{what} is not JSON: {e}"))
}

fn unpack(out: &Path, image: &str) -> Image {
    let version = workspace_version();
    let archive_path = out.join(format!("{}-{version}.oci.tar", name(image)));
    let archive = std::fs::read(&archive_path).unwrap_or_else(|e| panic!("read {}: {e}", archive_path.display()));
    let layout = out.join(format!("{image}-layout"));
    let root = out.join(format!("{image}-root"));
    std::fs::create_dir_all(&layout).expect("layout dir");
    std::fs::create_dir_all(&root).expect("root dir");
    run(Command::new("tar").arg("-xf").arg(&archive_path).arg("-C").arg(&layout));

    let layout_entries = list(&archive_path);
    let top: BTreeSet<&str> = layout_entries.iter().map(|(p, _, _)| p.split('/').next().unwrap_or(p)).collect();
    assert_eq!(top, BTreeSet::from(["blobs", "index.json", "oci-layout"]), "the archive is an OCI layout");
    let oci_layout = json(&std::fs::read(layout.join("oci-layout")).expect("oci-layout"), "oci-layout");
    assert_eq!(oci_layout["imageLayoutVersion"], "1.0.0");

    let index = json(&std::fs::read(layout.join("index.json")).expect("index.json"), "index.json");
    assert_eq!(index["mediaType"], "application/vnd.oci.image.index.v1+json");
    let manifests = index["manifests"].as_array().expect("manifests");
    assert_eq!(manifests.len(), 1, "one image per archive");
    assert_eq!(manifests[0]["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(manifests[0]["platform"]["os"], "linux");
    let manifest_digest = manifests[0]["digest"].as_str().expect("manifest digest").to_owned();
    let manifest_bytes = blob(&layout, &manifest_digest);
    assert_eq!(manifests[0]["size"], manifest_bytes.len(), "manifest size");
    let manifest = json(&manifest_bytes, "manifest");
    assert_eq!(manifest["schemaVersion"], 2);

    let config_digest = manifest["config"]["digest"].as_str().expect("config digest");
    assert_eq!(manifest["config"]["mediaType"], "application/vnd.oci.image.config.v1+json");
    let config_bytes = blob(&layout, config_digest);
    assert_eq!(manifest["config"]["size"], config_bytes.len(), "config size");
    let config = json(&config_bytes, "config");

    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "one layer");
    assert_eq!(layers[0]["mediaType"], "application/vnd.oci.image.layer.v1.tar");
    let layer_digest = layers[0]["digest"].as_str().expect("layer digest");
    let layer_bytes = blob(&layout, layer_digest);
    assert_eq!(layers[0]["size"], layer_bytes.len(), "layer size");
    // Uncompressed: the diff_id is the layer's digest.
    assert_eq!(config["rootfs"], serde_json::json!({"type": "layers", "diff_ids": [layer_digest]}));

    let layer_path = layout.join("blobs/sha256").join(layer_digest.trim_start_matches("sha256:"));
    let listed = list(&layer_path);
    let order: Vec<String> = listed.iter().map(|(path, _, _)| path.clone()).collect();
    let entries = listed.into_iter().map(|(path, mode, owner)| (path, (mode, owner))).collect();
    run(Command::new("tar").arg("-xpf").arg(&layer_path).arg("-C").arg(&root));
    Image { archive, index, manifest_digest, config, entries, order, root }
}

/// `tar --list --verbose` of an archive, in archive order: (path without the
/// trailing `/` of directories, mode string, uid/gid).
fn list(archive: &Path) -> Vec<(String, String, String)> {
    let output = run(Command::new("tar").arg("--list").arg("--verbose").arg("--numeric-owner").arg("-f").arg(archive));
    String::from_utf8(output.stdout)
        .expect("utf-8 listing")
        .lines()
        .map(|line| {
            // drwxr-xr-x 0/0 0 1970-01-01 00:00 etc/
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(fields.len(), 6, "unexpected tar listing line (a link or a space in a name?): {line}");
            (fields[5].trim_end_matches('/').to_owned(), fields[0].to_owned(), fields[1].to_owned())
        })
        .collect()
}

struct Builds {
    /// Output directories of the two builds.
    dirs: [PathBuf; 2],
    /// The printed lines of the first build.
    stdout: String,
    /// `images[i]` for `IMAGES[i]`, from each build.
    images: [Vec<Image>; 2],
}

fn builds() -> &'static Builds {
    static BUILDS: OnceLock<Builds> = OnceLock::new();
    BUILDS.get_or_init(|| {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("images");
        let dirs = [base.join("a"), base.join("b")];
        let stdout = build_into(&dirs[0]);
        build_into(&dirs[1]);
        let images = dirs.clone().map(|dir| IMAGES.iter().map(|(image, _)| unpack(&dir, image)).collect());
        Builds { dirs, stdout, images }
    })
}

fn workspace_version() -> String {
    let manifest = std::fs::read_to_string(repo_root().join("Cargo.toml")).expect("read Cargo.toml");
    let section = manifest.split("[workspace.package]").nth(1).expect("[workspace.package]");
    section
        .lines()
        .find_map(|line| line.strip_prefix("version = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("workspace version")
        .to_owned()
}

/// The shared objects `ldd` resolves for a binary, as absolute paths.
fn ldd(binary: &Path) -> Vec<String> {
    let output = run(Command::new("ldd").arg(binary));
    let listing = String::from_utf8(output.stdout).expect("utf-8 ldd");
    assert!(!listing.contains("not found"), "ldd {}: missing libraries:\n{listing}", binary.display());
    listing
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [_, "=>", path, ..] if path.starts_with('/') => Some((*path).to_owned()),
                [path, ..] if path.starts_with('/') => Some((*path).to_owned()),
                _ => None,
            }
        })
        .collect()
}

/// The instructions of a Dockerfile's last stage (from its `FROM`), with
/// continuation lines joined and comments dropped: (INSTRUCTION, arguments).
fn final_stage(dockerfile: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(dockerfile).unwrap_or_else(|e| panic!("read {}: {e}", dockerfile.display()));
    let mut instructions: Vec<(String, String)> = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && pending.is_empty()) {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        let full = std::mem::take(&mut pending);
        let (word, args) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
        instructions.push((word.to_uppercase(), args.trim().to_owned()));
    }
    let last_from = instructions.iter().rposition(|(word, _)| word == "FROM").expect("a FROM line");
    instructions.split_off(last_from)
}

#[test]
fn dockerfile_and_oci_image_describe_the_same_image() {
    let builds = builds();
    for (i, (image, default_cmd)) in IMAGES.iter().enumerate() {
        let oci = &builds.images[0][i];
        let config = &oci.config["config"];
        let dockerfile = repo_root().join(image).join("Dockerfile");
        let mut copied = Vec::new();
        for (word, args) in final_stage(&dockerfile) {
            let what = format!("{}: {word} {args}", dockerfile.display());
            match word.as_str() {
                "FROM" => assert_eq!(args, DISTROLESS, "{what}: images/build.sh reproduces this base only"),
                "USER" => assert_eq!(config["User"], args.as_str(), "{what}"),
                "EXPOSE" => {
                    let ports: BTreeSet<String> = args
                        .split_whitespace()
                        .map(|port| if port.contains('/') { port.to_owned() } else { format!("{port}/tcp") })
                        .collect();
                    let exposed: BTreeSet<String> =
                        config["ExposedPorts"].as_object().expect("ExposedPorts").keys().cloned().collect();
                    assert_eq!(exposed, ports, "{what}");
                }
                "ENTRYPOINT" => {
                    assert_eq!(config["Entrypoint"], json(args.as_bytes(), &what), "{what}")
                }
                "CMD" => {
                    let cmd = json(args.as_bytes(), &what);
                    assert_eq!(config["Cmd"], cmd, "{what}");
                    assert_eq!(cmd, serde_json::json!([default_cmd]), "{what}");
                }
                "COPY" => {
                    let dest = args.split_whitespace().last().expect("COPY destination");
                    copied.push(dest.to_owned());
                }
                _ => panic!("{what}: an instruction images/build.sh and this test do not know; teach them"),
            }
        }
        let binary_path = format!("/usr/local/bin/{}", name(image));
        assert_eq!(copied, std::slice::from_ref(&binary_path), "{}: COPY of the binary", dockerfile.display());
        assert_eq!(config["Entrypoint"], serde_json::json!([binary_path]));
        for dest in &copied {
            let (mode, owner) = oci.entries.get(dest.trim_start_matches('/')).expect("COPY destination in the layer");
            assert_eq!((mode.as_str(), owner.as_str()), ("-rwxr-xr-x", "0/0"), "{dest}");
        }
        let placed = std::fs::read(oci.root.join(binary_path.trim_start_matches('/'))).expect("binary in the layer");
        let built = std::fs::read(release_binary(image)).expect("read the release binary");
        assert!(placed == built, "{binary_path} in the layer is not the release binary");

        // What distroless cc-debian12:nonroot sets and the Dockerfile inherits.
        assert_eq!(config["WorkingDir"], "/home/nonroot");
        let env: Vec<&str> =
            config["Env"].as_array().expect("Env").iter().map(|v| v.as_str().expect("Env string")).collect();
        assert!(env.contains(&"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"), "{env:?}");
        assert!(env.contains(&"SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"), "{env:?}");
        assert_eq!(oci.config["os"], "linux");
        assert_eq!(oci.config["architecture"], "amd64");
    }
}

#[test]
fn names_labels_and_versions_match_the_chart() {
    let builds = builds();
    let version = workspace_version();
    let chart: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("charts/high-templar/Chart.yaml")).expect("read Chart.yaml"),
    )
    .expect("Chart.yaml");
    assert_eq!(chart["appVersion"].as_str(), Some(version.as_str()), "chart appVersion = workspace version");
    let values: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("charts/high-templar/values.yaml")).expect("read values.yaml"),
    )
    .expect("values.yaml");
    for (key, image) in [("gatewayImage", "gateway"), ("image", "operator")] {
        assert_eq!(values[key]["repository"].as_str(), Some(name(image).as_str()), "values.yaml {key}.repository");
    }

    for (i, (image, _)) in IMAGES.iter().enumerate() {
        let oci = &builds.images[0][i];
        let reference = format!("docker.io/library/{}:{version}", name(image));
        let annotations = &oci.index["manifests"][0]["annotations"];
        assert_eq!(annotations["io.containerd.image.name"], reference.as_str());
        assert_eq!(annotations["org.opencontainers.image.ref.name"], version.as_str());
        let printed = format!("{reference} {}", oci.manifest_digest);
        assert!(builds.stdout.contains(&printed), "build.sh prints {printed:?}; it printed:\n{}", builds.stdout);

        let labels = &oci.config["config"]["Labels"];
        assert_eq!(labels["org.opencontainers.image.title"], name(image).as_str());
        assert_eq!(labels["org.opencontainers.image.version"], version.as_str());
        assert_eq!(labels["org.opencontainers.image.licenses"], "MIT");
        assert_eq!(labels["org.opencontainers.image.source"], "https://github.com/high-templar/high-templar");
        assert_eq!(labels["org.opencontainers.image.revision"], "0123456789abcdef0123456789abcdef01234567");
        assert!(labels["org.opencontainers.image.description"].as_str().is_some_and(|d| !d.is_empty()));
        assert_eq!(oci.config["created"], "1970-01-01T00:00:00Z", "SOURCE_DATE_EPOCH unset: epoch 0");
    }

    // Another repository and version name the image accordingly.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("images/repository");
    let _ = std::fs::remove_dir_all(&dir);
    run(build_script()
        .args(["--repository", "registry.example/team/", "--version", "9.9.9-rc.1", "--bin-dir"])
        .arg(release_dir())
        .arg("--out")
        .arg(&dir)
        .arg("gateway"));
    let archive = dir.join("high-templar-gateway-9.9.9-rc.1.oci.tar");
    let index = run(Command::new("tar").arg("-xOf").arg(&archive).arg("index.json"));
    let index = json(&index.stdout, "index.json");
    let annotations = &index["manifests"][0]["annotations"];
    assert_eq!(annotations["io.containerd.image.name"], "registry.example/team/high-templar-gateway:9.9.9-rc.1");
    assert_eq!(annotations["org.opencontainers.image.ref.name"], "9.9.9-rc.1");
    assert!(!dir.join("high-templar-operator-9.9.9-rc.1.oci.tar").exists(), "only the image asked for");
}

#[test]
fn builds_are_reproducible() {
    let builds = builds();
    for (i, (image, _)) in IMAGES.iter().enumerate() {
        let [a, b] = [&builds.images[0][i], &builds.images[1][i]];
        assert_eq!(a.manifest_digest, b.manifest_digest, "{image}: manifest digests of {:?}", builds.dirs);
        assert!(a.archive == b.archive, "{image}: the two archives differ");
        assert_eq!(a.config["created"], b.config["created"]);
    }
    assert_ne!(builds.images[0][0].manifest_digest, builds.images[0][1].manifest_digest, "two different images");
}

#[test]
fn layer_holds_the_binary_its_libraries_and_nothing_else() {
    let builds = builds();
    for (i, (image, _)) in IMAGES.iter().enumerate() {
        let oci = &builds.images[0][i];
        let entries = &oci.entries;
        let libraries: Vec<String> =
            ldd(&release_binary(image)).iter().map(|path| path.trim_start_matches('/').to_owned()).collect();
        assert!(libraries.iter().any(|lib| lib.contains("libc.so")), "{image} links glibc: {libraries:?}");
        for library in &libraries {
            let (mode, owner) =
                entries.get(library).unwrap_or_else(|| panic!("{image}: {library} (ldd) not in the layer"));
            assert!(mode.starts_with('-'), "{image}: {library} is a regular file, not {mode}");
            assert_eq!(owner, "0/0", "{image}: {library}");
        }

        // Regular files: exactly these.
        let mut expected: BTreeSet<String> = libraries.iter().cloned().collect();
        expected.insert(format!("usr/local/bin/{}", name(image)));
        for file in ["etc/ssl/certs/ca-certificates.crt", "etc/passwd", "etc/group", "etc/nsswitch.conf"] {
            expected.insert(file.to_owned());
        }
        let files: BTreeSet<String> =
            entries.iter().filter(|(_, (mode, _))| !mode.starts_with('d')).map(|(path, _)| path.clone()).collect();
        assert_eq!(files, expected, "{image}: the layer's files");
        for shell in ["bin/sh", "bin/bash", "usr/bin/sh", "bin/busybox"] {
            assert!(!entries.contains_key(shell), "{image}: {shell} in the layer");
        }

        // Sorted, owned by root except the home of 65532; /tmp sticky.
        let mut sorted = oci.order.clone();
        sorted.sort();
        assert_eq!(oci.order, sorted, "{image}: layer entries in sorted order");
        for (path, (mode, owner)) in entries {
            let expected_owner = if path == "home/nonroot" { "65532/65532" } else { "0/0" };
            assert_eq!(owner, expected_owner, "{image}: owner of {path}");
            if mode.starts_with('d') {
                let expected_mode = if path == "tmp" { "drwxrwxrwt" } else { "drwxr-xr-x" };
                assert_eq!(mode, expected_mode, "{image}: mode of {path}");
            }
        }

        let ca = std::fs::read(oci.root.join("etc/ssl/certs/ca-certificates.crt")).expect("CA bundle");
        assert!(String::from_utf8_lossy(&ca).contains("-----BEGIN CERTIFICATE-----"), "{image}: CA bundle");
        let passwd = std::fs::read_to_string(oci.root.join("etc/passwd")).expect("passwd");
        assert!(passwd.lines().any(|l| l.starts_with("root:x:0:0:")), "{image}: root in passwd: {passwd}");
        assert!(
            passwd.lines().any(|l| l == "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin"),
            "{image}: nonroot in passwd: {passwd}"
        );
        let group = std::fs::read_to_string(oci.root.join("etc/group")).expect("group");
        assert!(group.lines().any(|l| l.starts_with("nonroot:x:65532:")), "{image}: nonroot in group: {group}");
        assert_eq!(oci.config["config"]["User"], "65532:65532", "{image}: runs as 65532");
    }
}

#[test]
fn binaries_run_from_the_extracted_layer_as_65532() {
    let builds = builds();
    let uid = run(Command::new("id").arg("-u"));
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        // chroot needs root; everything else of the image is checked above.
        eprintln!("not root: the chroot run of the images is not checked");
        return;
    }
    for (i, (image, cmd)) in IMAGES.iter().enumerate() {
        let oci = &builds.images[0][i];
        let binary = format!("/usr/local/bin/{}", name(image));
        let output =
            run(Command::new("chroot").arg("--userspec=65532:65532").arg(&oci.root).arg(&binary).arg("--help"));
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(help.contains(cmd), "{image} --help in the image lists {cmd}:\n{help}");
        // No shell to run anything else with.
        let shell = Command::new("chroot").arg(&oci.root).arg("/bin/sh").arg("-c").arg("true").output();
        assert!(!shell.is_ok_and(|o| o.status.success()), "{image}: /bin/sh ran in the image");
    }
}

#[test]
fn missing_binaries_fail_with_how_to_build_them() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("images/empty-bin");
    std::fs::create_dir_all(&dir).expect("empty dir");
    let output = build_script().arg("--bin-dir").arg(&dir).arg("--out").arg(dir.join("out")).output().expect("run");
    assert!(!output.status.success(), "build.sh succeeded without binaries");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cargo build --release --locked -p high-templar-gateway"),
        "build.sh says how to build the binaries: {stderr}"
    );
}

//! `deploy/kubernetes/`: every manifest validated against the Kubernetes API schemas by
//! `kubernetes-validate` (PyPI; it ships the schemas, so nothing is fetched at test time), the
//! manifests checked against each other, and the ConfigMap's config run by the real binary the
//! way the DaemonSet runs it, probes included. `kubernetes-validate` (and PyYAML with it) comes
//! from the README's setup step.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::http1;
use common::process::Proc;
use serde_json::Value;

/// The Kubernetes versions the manifests must be valid for: the oldest still supported by the
/// big distributions when this was written, and the newest the validator knows.
const VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    files
}

/// `kubernetes-validate`, run by the python3 whose PyYAML reads the manifests below.
fn validator() -> Command {
    let mut c = Command::new("python3");
    c.args(["-m", "kubernetes_validate"]);
    c
}

/// The YAML documents of `path`, through PyYAML (installed with kubernetes-validate).
fn documents(path: &Path) -> Vec<Value> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(path)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The one resource of `kind` among the manifests.
fn resource(kind: &str) -> Value {
    static ALL: std::sync::OnceLock<Vec<Value>> = std::sync::OnceLock::new();
    let all = ALL.get_or_init(|| manifests().iter().flat_map(|p| documents(p)).collect());
    let mut found: Vec<Value> = all.iter().filter(|d| d["kind"] == kind).cloned().collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found.remove(0)
}

#[test]
fn manifests_are_valid_kubernetes_resources() {
    let version = validator().arg("--version").output();
    assert!(
        version.is_ok_and(|o| o.status.success()),
        "kubernetes-validate not found: python3 -m pip install kubernetes-validate (the README's setup step)"
    );
    let files = manifests();
    assert!(files.len() >= 5, "{files:?}");
    for version in VERSIONS {
        // --strict: a misspelt field is an error, not silently dropped by the API server.
        let out = validator()
            .args(["--strict", "--kubernetes-version", version])
            .args(&files)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "Kubernetes {version}:\n{report}");
        for file in &files {
            assert!(
                report.contains(&format!("{} passed", file.display())),
                "{} not validated against {version}:\n{report}",
                file.display()
            );
        }
        assert!(!report.contains("WARN"), "{report}");
    }

    // The validator does find mistakes: a misspelt probe field fails.
    let daemonset = std::fs::read_to_string(dir().join("daemonset.yaml")).unwrap();
    let broken = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        broken.path(),
        daemonset.replace("path: /healthz", "paht: /healthz"),
    )
    .unwrap();
    let out = validator()
        .arg("--strict")
        .arg(broken.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn kustomization_applies_every_manifest_but_the_placeholder_secret() {
    let kustomization = &documents(&dir().join("kustomization.yaml"))[0];
    let listed: Vec<&str> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let mut files: Vec<String> = manifests()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|f| f != "secret.yaml")
        .collect();
    files.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, files);
    // The namespace first, so the rest has somewhere to go.
    assert_eq!(listed[0], "namespace.yaml");
    assert_eq!(kustomization["images"][0]["name"], "icp-gate");
}

/// The ConfigMap's config.
fn config_text() -> String {
    resource("ConfigMap")["data"]["icp-gate.toml"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn the_daemonset_config_secret_and_budget_fit_together() {
    let ds = resource("DaemonSet");
    let pod = &ds["spec"]["template"];
    let spec = &pod["spec"];
    assert_eq!(
        spec["hostNetwork"], true,
        "the client's destination address"
    );
    let container = &spec["containers"][0];
    let config: toml::Table = toml::from_str(&config_text()).unwrap();

    // The config file the container runs is the ConfigMap's, where the volume puts it.
    let mount = |volume: &str| -> String {
        container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == volume)
            .unwrap_or_else(|| panic!("no mount of {volume}"))["mountPath"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let volume = |name: &str| -> Value {
        spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .cloned()
            .unwrap()
    };
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[..2], ["run", "--config"]);
    assert_eq!(args[2], format!("{}/icp-gate.toml", mount("config")));
    assert_eq!(volume("config")["configMap"]["name"], "icp-gate");

    // The token file is the Secret's key, where its volume puts it.
    let secret = resource("Secret");
    let key = secret["stringData"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    assert_eq!(
        config["admin"]["token_file"].as_str().unwrap(),
        format!("{}/{key}", mount("admin-token"))
    );
    assert_eq!(
        volume("admin-token")["secret"]["secretName"],
        secret["metadata"]["name"]
    );

    // The registry lives in the hostPath volume.
    let state = mount("state");
    assert!(
        config["registry"]["state_dir"]
            .as_str()
            .unwrap()
            .starts_with(&state)
    );
    assert_eq!(volume("state")["hostPath"]["path"], state.as_str());

    // Probes and scrape annotations name the admin listener's port.
    let admin_port: u64 = config["admin"]["bind"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let ports = container["ports"].as_array().unwrap();
    let port = |name: &str| {
        ports.iter().find(|p| p["name"] == name).unwrap()["containerPort"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(port("admin"), admin_port);
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["livenessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "admin");
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], admin_port.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    // Every data listener's port is declared.
    for listener in config["listener"].as_array().unwrap() {
        let bind = listener["bind"].as_str().unwrap();
        let p: u64 = bind.rsplit(':').next().unwrap().parse().unwrap();
        assert!(
            ports.iter().any(|x| x["containerPort"] == p),
            "{bind} not declared"
        );
    }

    // The drain ends before the kubelet's SIGKILL.
    let drain =
        humantime::parse_duration(config["limits"]["drain_timeout"].as_str().unwrap()).unwrap();
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(Duration::from_secs(grace) > drain, "{grace} s");

    // Ports below 1024 with the node's network: exactly that capability, nothing else.
    let security = &container["securityContext"];
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        security["capabilities"]["add"],
        serde_json::json!(["NET_BIND_SERVICE"])
    );
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);

    // The budget covers the DaemonSet's pods, one node at a time.
    let pdb = resource("PodDisruptionBudget");
    for (label, value) in pdb["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&pod["metadata"]["labels"][label], value);
    }
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    for kind in ["ConfigMap", "Secret", "DaemonSet", "PodDisruptionBudget"] {
        assert_eq!(
            resource(kind)["metadata"]["namespace"],
            resource("Namespace")["metadata"]["name"]
        );
    }
}

/// The ConfigMap's config, moved to loopback and a temporary folder, passes `check` and serves
/// the probes the DaemonSet declares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configmap_config_runs_and_answers_the_probes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    std::fs::create_dir(dir.path().join("secret")).unwrap();
    std::fs::write(dir.path().join("secret/admin.token"), "k8s-test-token\n").unwrap();
    let text = config_text()
        .replace("/etc/icp-gate/secret", &format!("{d}/secret"))
        .replace("/var/lib/icp-gate", &format!("{d}/state"))
        .replace("0.0.0.0:80\"", "127.0.0.1:0\"")
        .replace("0.0.0.0:443\"", "127.0.0.1:0\"")
        .replace("0.0.0.0:9090", "127.0.0.1:0");
    assert!(!text.contains("0.0.0.0"), "{text}");
    let config = dir.path().join("icp-gate.toml");
    std::fs::write(&config, &text).unwrap();

    let out = Command::new(common::process::BIN)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let mut gate = Proc::start(&config);
    let admin = gate.admin_addr();
    gate.wait_for("ready");
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (status, _, body) = http1(admin, "GET", path, &[("host", "admin")], b"").await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    gate.signal(libc::SIGTERM);
    assert_eq!(gate.wait_exit(Duration::from_secs(10)), Some(0));
}

/// deploy/prometheus/prometheus-kubernetes.yml scrapes what the DaemonSet's annotations offer,
/// as the job the alert rules name. (Debian's Prometheus is built without Kubernetes service
/// discovery, so promtool cannot load it here: the relabelling is checked against the manifest.)
#[test]
fn prometheus_scrapes_the_annotated_pods_as_the_rules_job() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/prometheus-kubernetes.yml");
    let config = &documents(&path)[0];
    let job = &config["scrape_configs"][0];
    assert_eq!(job["job_name"], "icp-gate");
    let sd = &job["kubernetes_sd_configs"][0];
    assert_eq!(sd["role"], "pod");
    assert_eq!(
        sd["namespaces"]["names"][0],
        resource("Namespace")["metadata"]["name"]
    );
    let annotations = resource("DaemonSet")["spec"]["template"]["metadata"]["annotations"].clone();
    let relabel = job["relabel_configs"].as_array().unwrap();
    let sources: Vec<String> = relabel
        .iter()
        .flat_map(|r| r["source_labels"].as_array().unwrap().iter())
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    for annotation in annotations.as_object().unwrap().keys() {
        // Prometheus' spelling of an annotation as a label.
        let label = format!(
            "__meta_kubernetes_pod_annotation_{}",
            annotation.replace(['.', '/'], "_")
        );
        assert!(
            sources.contains(&label),
            "{annotation} is not used: {sources:?}"
        );
    }
    let keep_port = relabel
        .iter()
        .find(|r| r["source_labels"][0] == "__meta_kubernetes_pod_container_port_name")
        .unwrap();
    let container = &resource("DaemonSet")["spec"]["template"]["spec"]["containers"][0];
    assert!(
        container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == keep_port["regex"]),
        "the kept port name is the container's admin port"
    );
    assert_eq!(config["rule_files"][0], "icp-gate.rules.yml");
}

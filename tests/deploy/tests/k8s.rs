//! `deploy/k8s`: the rendered manifests validate against the Kubernetes schemas
//! (`kubernetes-validate --strict`, which bundles them), and carry the security fields the
//! deployment promises.

use std::{fs, net::IpAddr, path::Path, process::Command, sync::OnceLock};

use ipnet::IpNet;
use serde_json::Value;
use taskgate_deploy_tests::{
    find, repo, require, require_python_module, run, yaml_documents, INSTALL_DEPS,
};

const SOCKET: &str = "unix:/run/taskgate/worker.sock";
const METADATA: [&str; 2] = ["169.254.169.254", "fd00:ec2::254"];

/// Renders a kustomization directory with `kubectl kustomize`.
fn kustomize(dir: &Path) -> String {
    let kubectl = require("kubectl", "renders the kustomize layout");
    let out = run(Command::new(kubectl).arg("kustomize").arg(dir));
    assert!(
        out.ok,
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        out.stderr
    );
    out.stdout
}

/// Every base object, rendered. Without kubectl the files are schema-checked one by one
/// first (so their findings are still reported), and the test then fails: the
/// kustomization itself was not checked.
fn rendered_base() -> String {
    let base = repo("deploy/k8s/base");
    if find("kubectl").is_none() {
        for entry in fs::read_dir(&base).expect("read deploy/k8s/base") {
            let path = entry.expect("dir entry").path();
            if path.file_name() != Some("kustomization.yaml".as_ref())
                && path.extension() == Some("yaml".as_ref())
            {
                validate(&fs::read_to_string(&path).expect("read manifest"), &path);
            }
        }
        panic!(
            "kubectl is not installed, so the kustomization was not rendered (each file was \
             schema-checked on its own); run {INSTALL_DEPS} and try again"
        );
    }
    kustomize(&base)
}

/// Fails on any finding of `kubernetes-validate --strict` (errors and warnings alike).
fn validate(yaml: &str, what: &Path) {
    require_python_module("kubernetes_validate", "kubernetes-validate");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("manifests.yaml");
    fs::write(&file, yaml).expect("write manifests");
    let out = run(Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--quiet"])
        .arg(&file));
    let findings = format!("{}{}", out.stdout, out.stderr);
    assert!(
        out.ok && findings.trim().is_empty(),
        "kubernetes-validate --strict found problems in {}:\n{findings}",
        what.display()
    );
    // --quiet prints nothing on success: make sure it did look at every object.
    let loud = run(Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .arg(&file));
    let objects = yaml_documents(yaml).len();
    let passed = loud.stdout.matches(" passed ").count();
    assert_eq!(
        passed,
        objects,
        "kubernetes-validate checked {passed} of {objects} objects in {}:\n{}",
        what.display(),
        loud.stdout
    );
}

/// The rendered base, parsed once for all tests of this file.
fn objects() -> Vec<Value> {
    static OBJECTS: OnceLock<Vec<Value>> = OnceLock::new();
    OBJECTS
        .get_or_init(|| yaml_documents(&rendered_base()))
        .clone()
}

fn one<'a>(objs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objs.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

fn pod_spec(objs: &[Value]) -> &Value {
    &one(objs, "Deployment")["spec"]["template"]["spec"]
}

/// Every container of the pod (init, sidecar and main), with its list's name.
fn containers(pod: &Value) -> Vec<(&'static str, &Value)> {
    let mut all = Vec::new();
    for list in ["initContainers", "containers"] {
        for c in pod[list].as_array().into_iter().flatten() {
            all.push((list, c));
        }
    }
    all
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    containers(pod)
        .into_iter()
        .map(|(_, c)| c)
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container named {name}"))
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

#[test]
fn base_validates_against_the_kubernetes_schemas() {
    let yaml = rendered_base();
    validate(&yaml, &repo("deploy/k8s/base"));
    let kinds: Vec<String> = yaml_documents(&yaml)
        .iter()
        .map(|o| o["kind"].as_str().unwrap_or("?").to_string())
        .collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "Deployment",
        "Service",
        "NetworkPolicy",
    ] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "no {kind} in the base: {kinds:?}"
        );
    }
}

#[test]
fn example_overlay_renders_with_its_secret_generator_and_validates() {
    require("kubectl", "renders the example overlay");
    let tmp = tempfile::tempdir().expect("temp dir");
    let copy = tmp.path().join("k8s");
    let cp = run(Command::new("cp")
        .arg("-r")
        .arg(repo("deploy/k8s"))
        .arg(&copy));
    assert!(cp.ok, "copy deploy/k8s: {}", cp.stderr);
    let secrets = copy.join("overlays/example/secrets");
    fs::create_dir_all(&secrets).expect("secrets dir");
    for f in [
        "tokens",
        "server.pem",
        "server.key",
        "clients-ca.pem",
        "database-url",
    ] {
        fs::write(secrets.join(f), "placeholder\n").expect("placeholder secret");
    }
    let overlay = copy.join("overlays/example");
    let yaml = kustomize(&overlay);
    validate(&yaml, &overlay);
    let objs = yaml_documents(&yaml);
    let secret_names: Vec<&str> = objs
        .iter()
        .filter(|o| o["kind"] == "Secret")
        .filter_map(|o| o["metadata"]["name"].as_str())
        .collect();
    // Everything the pod mounts or reads exists, under the stable name it uses.
    let pod = pod_spec(&objs);
    let mut referenced: Vec<&str> = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["secret"]["secretName"].as_str())
        .collect();
    for (_, c) in containers(pod) {
        for e in c["env"].as_array().into_iter().flatten() {
            if let Some(n) = e["valueFrom"]["secretKeyRef"]["name"].as_str() {
                referenced.push(n);
            }
        }
    }
    for name in referenced {
        assert!(
            secret_names.contains(&name),
            "the pod uses Secret {name}, the overlay generates {secret_names:?}"
        );
    }
}

#[test]
fn every_container_is_locked_down() {
    let objs = objects();
    let pod = pod_spec(&objs);
    let psc = &pod["securityContext"];
    assert_eq!(psc["runAsNonRoot"], true, "pod runAsNonRoot");
    assert_eq!(
        psc["seccompProfile"]["type"], "RuntimeDefault",
        "pod seccompProfile"
    );
    assert_eq!(
        pod["automountServiceAccountToken"], false,
        "no API token in the pod"
    );
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        assert_ne!(pod[host], true, "{host} must not be set");
    }
    for v in pod["volumes"].as_array().into_iter().flatten() {
        assert!(v.get("hostPath").is_none(), "hostPath volume {}", v["name"]);
    }
    let all = containers(pod);
    assert!(all.len() >= 2, "worker and gateway expected");
    for (list, c) in all {
        let name = &c["name"];
        let sc = &c["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true, "{list}/{name}: runAsNonRoot");
        assert_ne!(sc["runAsUser"], 0, "{list}/{name}: runAsUser 0");
        assert_eq!(
            sc["readOnlyRootFilesystem"], true,
            "{list}/{name}: readOnlyRootFilesystem"
        );
        assert_eq!(
            sc["allowPrivilegeEscalation"], false,
            "{list}/{name}: allowPrivilegeEscalation"
        );
        assert_ne!(sc["privileged"], true, "{list}/{name}: privileged");
        assert_eq!(
            strs(&sc["capabilities"]["drop"]),
            ["ALL"],
            "{list}/{name}: capabilities.drop"
        );
        assert!(
            sc["capabilities"].get("add").is_none(),
            "{list}/{name}: capabilities.add"
        );
        assert_eq!(
            sc["seccompProfile"]["type"], "RuntimeDefault",
            "{list}/{name}: seccompProfile"
        );
        assert!(
            c["resources"]["limits"]["memory"].is_string(),
            "{list}/{name}: memory limit"
        );
    }
    let sa = one(&objs, "ServiceAccount");
    assert_eq!(sa["automountServiceAccountToken"], false);
    let ns = one(&objs, "Namespace");
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
}

#[test]
fn gateway_is_a_native_sidecar_sharing_only_the_socket_directory() {
    let objs = objects();
    let pod = pod_spec(&objs);
    let gateway = pod["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "gateway")
        .expect("the gateway is an init container");
    assert_eq!(
        gateway["restartPolicy"], "Always",
        "native sidecar: restartPolicy Always"
    );
    let worker = pod["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "worker")
        .expect("the worker is a main container");

    let socket_volume = |c: &Value| -> String {
        c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["mountPath"] == "/run/taskgate")
            .and_then(|m| m["name"].as_str())
            .unwrap_or_else(|| panic!("{} does not mount /run/taskgate", c["name"]))
            .to_string()
    };
    let vol = socket_volume(gateway);
    assert_eq!(vol, socket_volume(worker), "one shared socket volume");
    let def = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == vol.as_str())
        .expect("socket volume defined");
    assert!(
        def["emptyDir"].is_object(),
        "the socket volume is an emptyDir"
    );

    assert!(
        strs(&gateway["args"]).contains(&format!("--upstream={SOCKET}").as_str()),
        "the gateway's upstream is the worker's socket: {:?}",
        gateway["args"]
    );
    let listen = worker["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "TASKGATE_METRICS_LISTEN")
        .expect("TASKGATE_METRICS_LISTEN");
    assert_eq!(listen["value"], SOCKET);
    assert!(
        worker.get("ports").is_none(),
        "the worker has no port: {}",
        worker["ports"]
    );
    // The worker never sees the gateway's secrets.
    let worker_mounts: Vec<&str> = worker["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["name"].as_str())
        .collect();
    for v in pod["volumes"].as_array().into_iter().flatten() {
        if v["secret"].is_object() {
            let name = v["name"].as_str().unwrap_or_default();
            assert!(
                !worker_mounts.contains(&name),
                "the worker mounts secret volume {name}"
            );
        }
    }
}

#[test]
fn probes_use_worker_healthcheck_and_a_gateway_tcp_check() {
    let objs = objects();
    let pod = pod_spec(&objs);
    let worker = container(pod, "worker");
    for probe in ["livenessProbe", "readinessProbe"] {
        let cmd = strs(&worker[probe]["exec"]["command"]);
        assert!(
            cmd.first().is_some_and(|p| p.ends_with("worker")),
            "worker {probe} runs the worker binary: {cmd:?}"
        );
        assert_eq!(
            &cmd[1..],
            ["healthcheck", "--metrics-listen", SOCKET],
            "worker {probe}"
        );
    }
    let gateway = container(pod, "gateway");
    let port = gateway["ports"][0]["name"].clone();
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(
            gateway[probe]["tcpSocket"]["port"], port,
            "gateway {probe} is a TCP check of its port"
        );
    }
}

#[test]
fn token_tls_and_database_url_come_from_secrets() {
    let objs = objects();
    let pod = pod_spec(&objs);
    let gateway = container(pod, "gateway");
    let args = strs(&gateway["args"]);
    let volume_of = |path_flag: &str| -> String {
        let path = args
            .iter()
            .find_map(|a| a.strip_prefix(&format!("{path_flag}=")))
            .unwrap_or_else(|| panic!("gateway has no {path_flag}"));
        let mount = gateway["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| {
                m["mountPath"]
                    .as_str()
                    .is_some_and(|mp| path.starts_with(&format!("{mp}/")))
            })
            .unwrap_or_else(|| panic!("{path_flag}={path} is not on a mounted volume"));
        mount["name"].as_str().unwrap_or_default().to_string()
    };
    for flag in [
        "--auth-token-file",
        "--tls-cert",
        "--tls-key",
        "--tls-client-ca",
    ] {
        let vol = volume_of(flag);
        let def = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == vol.as_str())
            .expect("volume defined");
        assert!(
            def["secret"]["secretName"].is_string(),
            "{flag} must come from a Secret volume, {vol} is {def}"
        );
    }
    assert!(
        !args.iter().any(|a| a.starts_with("--auth-token=")),
        "no inline token in argv"
    );
    for (_, c) in containers(pod) {
        for e in c["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().unwrap_or_default();
            if ["DATABASE_URL", "METRICS_AUTH_TOKEN"].contains(&name) {
                assert!(
                    e["valueFrom"]["secretKeyRef"].is_object(),
                    "{}: {name} must come from a Secret",
                    c["name"]
                );
            }
        }
    }
}

#[test]
fn service_exposes_only_the_gateway_port() {
    let objs = objects();
    let svc = one(&objs, "Service");
    let ports = svc["spec"]["ports"].as_array().expect("ports");
    assert_eq!(ports.len(), 1, "one port: {ports:?}");
    let pod = pod_spec(&objs);
    let gateway = container(pod, "gateway");
    let target = &ports[0]["targetPort"];
    assert!(
        gateway["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| &p["name"] == target || &p["containerPort"] == target),
        "the Service targets {target}, which is not a gateway port"
    );
    assert_ne!(svc["spec"]["type"], "NodePort");
    assert_ne!(svc["spec"]["type"], "LoadBalancer");
}

#[test]
fn network_policy_denies_by_default_and_never_admits_the_metadata_service() {
    let objs = objects();
    let np = one(&objs, "NetworkPolicy");
    let spec = &np["spec"];
    let types = strs(&spec["policyTypes"]);
    assert!(
        types.contains(&"Egress") && types.contains(&"Ingress"),
        "{types:?}"
    );
    let egress = spec["egress"].as_array().expect("egress rules");
    let metadata: Vec<IpAddr> = METADATA.iter().map(|a| a.parse().unwrap()).collect();
    let mut dns = false;
    let mut database = false;
    for rule in egress {
        let to = rule["to"].as_array().map(Vec::as_slice).unwrap_or_default();
        let ports = rule["ports"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        assert!(
            !to.is_empty(),
            "an egress rule without `to` allows every destination: {rule}"
        );
        assert!(
            !ports.is_empty(),
            "an egress rule without `ports` allows every port: {rule}"
        );
        let port_nums: Vec<i64> = ports.iter().filter_map(|p| p["port"].as_i64()).collect();
        dns |= port_nums.contains(&53);
        database |= port_nums.contains(&5432);
        for peer in to {
            let Some(block) = peer.get("ipBlock") else {
                continue;
            };
            let cidr: IpNet = block["cidr"]
                .as_str()
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("bad ipBlock cidr {block}"));
            let except: Vec<IpNet> = strs(&block["except"])
                .iter()
                .map(|c| c.parse().unwrap_or_else(|_| panic!("bad except {c}")))
                .collect();
            for ip in &metadata {
                if cidr.contains(ip) {
                    assert!(
                        except.iter().any(|e| e.contains(ip)),
                        "ipBlock {cidr} admits the metadata service {ip}: list it under except"
                    );
                }
            }
        }
    }
    assert!(dns, "no DNS rule (port 53)");
    assert!(database, "no database rule (port 5432)");
    let ingress = spec["ingress"].as_array().expect("ingress rules");
    for rule in ingress {
        assert!(
            rule["from"].as_array().is_some_and(|f| !f.is_empty()),
            "an ingress rule without `from` admits everyone: {rule}"
        );
        let ports: Vec<i64> = rule["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["port"].as_i64())
            .collect();
        assert_eq!(ports, [9443], "ingress only to the gateway port");
    }
}

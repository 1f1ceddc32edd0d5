//! The ServiceFence CRD: `lazyload crd` prints exactly `crds/servicefence.yaml`, and its schema
//! is structural (kube-apiserver would accept it), and Slime's fences validate against it.

use std::process::Command;

use serde_json::Value;

fn crd_output() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_lazyload"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn crd_file_is_the_command_output() {
    let file =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/servicefence.yaml")).unwrap();
    assert!(
        file == crd_output(),
        "crds/servicefence.yaml is stale: run `cargo run -- crd > crds/servicefence.yaml`"
    );
}

/// The structural-schema rules of apiextensions.k8s.io/v1 that a derived schema can break.
fn check_structural(schema: &Value, path: &str, errors: &mut Vec<String>) {
    let Some(obj) = schema.as_object() else {
        errors.push(format!(
            "{path}: schema is `{schema}`, not an object (no bare true/false schemas)"
        ));
        return;
    };
    let int_or_string = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    let preserve = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if !obj.contains_key("type") && !int_or_string && !preserve {
        errors.push(format!("{path}: no type"));
    }
    if int_or_string && obj.contains_key("type") {
        errors.push(format!("{path}: int-or-string must not have a type"));
    }
    for forbidden in ["$ref", "definitions", "$defs", "oneOf", "anyOf", "allOf", "not"] {
        if obj.contains_key(forbidden) {
            errors.push(format!("{path}: `{forbidden}` is not allowed here"));
        }
    }
    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        errors.push(format!("{path}: properties and additionalProperties together"));
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            check_structural(v, &format!("{path}.{k}"), errors);
        }
    }
    if let Some(ap) = obj.get("additionalProperties") {
        check_structural(ap, &format!("{path}.*"), errors);
    }
    if let Some(items) = obj.get("items") {
        check_structural(items, &format!("{path}[]"), errors);
    }
}

#[test]
fn schema_is_structural() {
    let crd: Value = lazyload::yaml::from_str(&crd_output()).unwrap();
    assert_eq!(crd["spec"]["group"], "microservice.slime.io");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(version["subresources"]["status"], serde_json::json!({}));
    let mut errors = Vec::new();
    check_structural(
        &version["schema"]["openAPIV3Schema"],
        "openAPIV3Schema",
        &mut errors,
    );
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn structural_check_catches_violations() {
    let mut errors = Vec::new();
    let bad = serde_json::json!({"type": "object", "properties": {"a": true, "b": {"description": "x"},
        "c": {"type": "object", "properties": {}, "additionalProperties": {"type": "string"}}}});
    check_structural(&bad, "s", &mut errors);
    assert_eq!(errors.len(), 3, "{errors:#?}");
}

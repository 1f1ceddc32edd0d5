//! Validation of an object against a CRD's structural schema, the way kube-apiserver does it for
//! the parts the ServiceFence schema uses: `null` in a field that is not `nullable` is pruned
//! first, then types, `required`, and (stricter than the server, which prunes them silently)
//! fields the schema does not know are reported.

use serde_json::Value;

/// The `openAPIV3Schema` of the first version of the CRD in `crd_yaml`.
pub fn crd_schema(crd_yaml: &str) -> Value {
    let crd: Value = lazyload::yaml::from_str(crd_yaml).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// Every violation of `schema` by `object` (a whole custom resource), by path.
pub fn validate(schema: &Value, object: &Value) -> Vec<String> {
    let mut object = object.clone();
    if let Some(map) = object.as_object_mut() {
        // Validated by the server itself, outside the CRD's schema.
        for meta in ["apiVersion", "kind", "metadata"] {
            map.remove(meta);
        }
    }
    let mut errors = Vec::new();
    check(schema, &object, "", &mut errors);
    errors
}

fn check(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return;
    }
    if value.is_null() && schema.get("nullable") == Some(&Value::Bool(true)) {
        return;
    }
    if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        if !(value.is_i64() || value.is_u64() || value.is_string()) {
            errors.push(format!("{path}: {value} is neither an integer nor a string"));
        }
        return;
    }
    let ty = schema.get("type").and_then(Value::as_str).unwrap_or("");
    let ok = match ty {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        _ => true,
    };
    if !ok {
        errors.push(format!("{path}: {value} is not of type {ty}"));
        return;
    }
    if let Some(items) = schema.get("items")
        && let Some(list) = value.as_array()
    {
        for (i, item) in list.iter().enumerate() {
            check(items, item, &format!("{path}[{i}]"), errors);
        }
    }
    let Some(map) = value.as_object() else {
        return;
    };
    let props = schema.get("properties").and_then(Value::as_object);
    for (key, field) in map {
        let sub = props
            .and_then(|p| p.get(key))
            .or_else(|| schema.get("additionalProperties"));
        let Some(sub) = sub else {
            errors.push(format!("{path}.{key}: unknown field"));
            continue;
        };
        if field.is_null() && sub.get("nullable") != Some(&Value::Bool(true)) {
            continue; // pruned by the server before validation
        }
        check(sub, field, &format!("{path}.{key}"), errors);
    }
    for required in schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = required.as_str().unwrap_or_default();
        if map.get(name).is_none_or(Value::is_null) {
            errors.push(format!("{path}.{name}: required"));
        }
    }
}

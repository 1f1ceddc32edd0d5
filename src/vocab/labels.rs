//! Label matching: Kubernetes `LabelSelector`s and plain `key: value` selectors.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Labels of an object.
pub type Labels = BTreeMap<String, String>;

/// True when every `key: value` of `selector` is in `labels`. An empty selector matches nothing:
/// lazyload never reads "no constraint" as "everything".
pub fn subset_matches(selector: &Labels, labels: &Labels) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Checks that a `LabelSelector` only uses the operators Kubernetes defines, with the values
/// each one needs.
pub fn check_selector(selector: &LabelSelector) -> Result<(), String> {
    for (i, e) in selector.match_expressions.iter().flatten().enumerate() {
        let has_values = e.values.as_ref().is_some_and(|v| !v.is_empty());
        match e.operator.as_str() {
            "In" | "NotIn" if !has_values => {
                return Err(format!("matchExpressions[{i}]: {} needs values", e.operator));
            }
            "Exists" | "DoesNotExist" if has_values => {
                return Err(format!("matchExpressions[{i}]: {} takes no values", e.operator));
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => return Err(format!("matchExpressions[{i}]: unknown operator {other:?}")),
        }
    }
    Ok(())
}

/// True when `labels` satisfy a Kubernetes `LabelSelector` (matchLabels AND matchExpressions).
/// An empty selector matches everything, as in Kubernetes.
pub fn selector_matches(selector: &LabelSelector, labels: &Labels) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    labels_ok
        && selector.match_expressions.iter().flatten().all(|e| {
            let value = labels.get(&e.key);
            let listed = || value.is_some_and(|v| e.values.iter().flatten().any(|x| x == v));
            match e.operator.as_str() {
                "In" => listed(),
                "NotIn" => !listed(),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn subset() {
        let l = labels(&[("app", "reviews"), ("group", "default")]);
        assert!(subset_matches(&labels(&[("app", "reviews")]), &l));
        assert!(subset_matches(&l, &l));
        assert!(!subset_matches(&labels(&[("app", "details")]), &l));
        assert!(!subset_matches(&labels(&[]), &l));
    }

    #[test]
    fn kubernetes_selectors() {
        let req = |key: &str, op: &str, values: &[&str]| LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        };
        let sel = LabelSelector {
            match_labels: Some(labels(&[("env", "prod")])),
            match_expressions: Some(vec![
                req("app", "In", &["cassandra", "spark"]),
                req("legacy", "DoesNotExist", &[]),
            ]),
        };
        assert!(selector_matches(
            &sel,
            &labels(&[("env", "prod"), ("app", "spark")])
        ));
        assert!(!selector_matches(
            &sel,
            &labels(&[("env", "prod"), ("app", "kafka")])
        ));
        assert!(!selector_matches(
            &sel,
            &labels(&[("env", "prod"), ("app", "spark"), ("legacy", "")])
        ));
        assert!(selector_matches(&LabelSelector::default(), &labels(&[])));
        assert!(check_selector(&sel).is_ok());
        let bad = LabelSelector {
            match_expressions: Some(vec![req("a", "Like", &["x"])]),
            ..Default::default()
        };
        assert!(check_selector(&bad).unwrap_err().contains("unknown operator"));
        let bad = LabelSelector {
            match_expressions: Some(vec![req("a", "In", &[])]),
            ..Default::default()
        };
        assert!(check_selector(&bad).unwrap_err().contains("needs values"));
    }
}

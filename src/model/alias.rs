//! `domainAliases`: extra hosts derived from a dependency by RE2 patterns with named groups.

use crate::config::DomainAlias;

/// The host and every alias of it. A rule applies when its pattern matches the host exactly once
/// (as in Slime); each template is expanded with the match's groups (`$namespace`,
/// `${service}`). Empty expansions are skipped; the caller validates the rest.
pub fn with_aliases(host: &str, rules: &[DomainAlias]) -> Vec<String> {
    let mut out = vec![host.to_string()];
    for rule in rules {
        let mut matches = rule.pattern.captures_iter(host);
        let (Some(caps), None) = (matches.next(), matches.next()) else {
            continue;
        };
        for template in &rule.templates {
            let mut alias = String::new();
            caps.expand(template, &mut alias);
            if !alias.is_empty() && !out.contains(&alias) {
                out.push(alias);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use regex::Regex;

    fn rule(pattern: &str, templates: &[&str]) -> DomainAlias {
        DomainAlias {
            pattern: Regex::new(pattern).unwrap(),
            templates: templates.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[test]
    fn mailsaas_example_from_the_slime_tutorial() {
        let rules = [rule(
            r"(?P<service>[^\.]+)\.(?P<namespace>[^\.]+)\.svc\.cluster\.local$",
            &["$namespace.$service.mailsaas"],
        )];
        assert_eq!(
            with_aliases("details.default.svc.cluster.local", &rules),
            vec!["details.default.svc.cluster.local", "default.details.mailsaas"]
        );
        assert_eq!(with_aliases("www.163.com", &rules), vec!["www.163.com"]);
    }

    #[test]
    fn several_matches_or_empty_expansions_add_nothing() {
        let rules = [rule(r"[a-z]+", &["x"]), rule(r"^(?P<a>q)?z", &["$a"])];
        assert_eq!(with_aliases("ab.cd", &rules), vec!["ab.cd"]);
        assert_eq!(with_aliases("z", &rules), vec!["z", "x"]);
    }
}

//! RBAC as the API server's authorizer evaluates it: policy rules (verbs, API groups,
//! resources with subresources, resource names) granted to users and groups, cluster-wide or in
//! one namespace. The collector's own requests are checked against the ClusterRole of
//! deploy/base/rbac.yaml, so that the bundle's RBAC is what the tests prove sufficient.

use serde_json::Value;

/// Who a grant is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    User(String),
    Group(String),
}

/// One rule of a Role or ClusterRole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRule {
    pub verbs: Vec<String>,
    pub api_groups: Vec<String>,
    /// `pods`, `pods/log`, `nodes/proxy`, or `*`.
    pub resources: Vec<String>,
    /// Empty: any name.
    pub resource_names: Vec<String>,
}

impl PolicyRule {
    /// A rule from a ClusterRole's `rules[]` entry.
    pub fn from_json(rule: &Value) -> Self {
        let strings = |key: &str| -> Vec<String> {
            rule[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        Self {
            verbs: strings("verbs"),
            api_groups: strings("apiGroups"),
            resources: strings("resources"),
            resource_names: strings("resourceNames"),
        }
    }

    /// A rule for `verb` on `resource` (`""` group) — the tests' usual grant.
    pub fn core(verb: &str, resource: &str) -> Self {
        Self {
            verbs: vec![verb.to_owned()],
            api_groups: vec![String::new()],
            resources: vec![resource.to_owned()],
            resource_names: Vec::new(),
        }
    }
}

/// A binding: the rules granted to a subject, in a namespace or (`None`) cluster-wide.
#[derive(Debug, Clone)]
pub struct Grant {
    pub subject: Subject,
    pub namespace: Option<String>,
    pub rules: Vec<PolicyRule>,
}

/// What a request (or a SubjectAccessReview) asks to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Attributes {
    pub(super) verb: String,
    pub(super) group: String,
    pub(super) resource: String,
    pub(super) subresource: String,
    pub(super) namespace: String,
    pub(super) name: String,
}

fn contains_or_star(list: &[String], value: &str) -> bool {
    list.iter().any(|v| v == "*" || v == value)
}

impl PolicyRule {
    fn allows(&self, a: &Attributes) -> bool {
        let resource = if a.subresource.is_empty() {
            a.resource.clone()
        } else {
            format!("{}/{}", a.resource, a.subresource)
        };
        contains_or_star(&self.verbs, &a.verb)
            && contains_or_star(&self.api_groups, &a.group)
            && contains_or_star(&self.resources, &resource)
            && (self.resource_names.is_empty()
                || (!a.name.is_empty() && self.resource_names.contains(&a.name)))
    }
}

/// Whether `user` (with `groups`) may do `attributes` under `grants`.
pub(super) fn allowed(
    grants: &[Grant],
    user: &str,
    groups: &[String],
    attributes: &Attributes,
) -> bool {
    grants.iter().any(|grant| {
        let subject = match &grant.subject {
            Subject::User(u) => u == user,
            Subject::Group(g) => groups.contains(g),
        };
        let scope = grant
            .namespace
            .as_ref()
            .is_none_or(|ns| *ns == attributes.namespace);
        subject && scope && grant.rules.iter().any(|r| r.allows(attributes))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(verb: &str, resource: &str, sub: &str, ns: &str, name: &str) -> Attributes {
        Attributes {
            verb: verb.into(),
            group: String::new(),
            resource: resource.into(),
            subresource: sub.into(),
            namespace: ns.into(),
            name: name.into(),
        }
    }

    #[test]
    fn namespaced_grants_stay_in_their_namespace() {
        let grants = [Grant {
            subject: Subject::User("alice".into()),
            namespace: Some("ns-a".into()),
            rules: vec![PolicyRule::core("get", "pods/log")],
        }];
        assert!(allowed(
            &grants,
            "alice",
            &[],
            &attrs("get", "pods", "log", "ns-a", "p")
        ));
        assert!(!allowed(
            &grants,
            "alice",
            &[],
            &attrs("get", "pods", "log", "ns-b", "p")
        ));
        assert!(!allowed(
            &grants,
            "alice",
            &[],
            &attrs("get", "pods", "", "ns-a", "p")
        ));
        assert!(!allowed(
            &grants,
            "bob",
            &[],
            &attrs("get", "pods", "log", "ns-a", "p")
        ));
        let named = [Grant {
            subject: Subject::Group("ops".into()),
            namespace: None,
            rules: vec![PolicyRule {
                resource_names: vec!["n1".into()],
                ..PolicyRule::core("get", "nodes/proxy")
            }],
        }];
        let ops = ["ops".to_owned()];
        assert!(allowed(
            &named,
            "x",
            &ops,
            &attrs("get", "nodes", "proxy", "", "n1")
        ));
        assert!(!allowed(
            &named,
            "x",
            &ops,
            &attrs("get", "nodes", "proxy", "", "n2")
        ));
    }
}

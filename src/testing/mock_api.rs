//! A mock API server faithful to a real one for what lazyload uses: list and watch of each kind
//! at its real path (group, version, and the plural its CRD declares: hard-coded here, never
//! taken from the code under test), discovery of every group-version it serves, writes of
//! namespaced objects and their status (kept, and answered with the whole object as written, as
//! a real server answers), Events, and Leases read, created and patched with a real server's
//! rules (what the leader election does); `404 NotFound` for everything else, as a real API
//! server answers an unknown path.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock;

/// `(group-version path, plural, kind, namespaced)` of everything served.
const RESOURCES: &[(&str, &str, &str, bool)] = &[
    ("/api/v1", "namespaces", "Namespace", false),
    ("/api/v1", "services", "Service", true),
    ("/api/v1", "pods", "Pod", true),
    (
        "/apis/networking.istio.io/v1beta1",
        "virtualservices",
        "VirtualService",
        true,
    ),
    (
        "/apis/networking.istio.io/v1beta1",
        "serviceentries",
        "ServiceEntry",
        true,
    ),
    ("/apis/networking.istio.io/v1beta1", "sidecars", "Sidecar", true),
    (
        "/apis/networking.istio.io/v1alpha3",
        "envoyfilters",
        "EnvoyFilter",
        true,
    ),
    (
        "/apis/microservice.slime.io/v1alpha1",
        "servicefences",
        "ServiceFence",
        true,
    ),
    ("/apis/events.k8s.io/v1", "events", "Event", true),
    ("/apis/coordination.k8s.io/v1", "leases", "Lease", true),
];

/// Kinds whose objects are created and patched with a real server's rules: a POST of an existing
/// object is 409, a merge patch of a missing one is 404 (a server-side apply creates it), and
/// every write bumps the resource version. (A GET of one object answers it or 404 for every kind.)
const STRICT: &[&str] = &["Lease"];

/// One write the server received: method, path with query, body.
pub type Write = (String, String, Value);

/// The mock's content; [`MockApi::client`] starts it.
#[derive(Default)]
pub struct MockApi {
    items: BTreeMap<&'static str, Vec<Value>>,
    failing: BTreeMap<&'static str, u16>,
    plurals: BTreeMap<&'static str, &'static str>,
    writes: Arc<Mutex<Vec<Write>>>,
    resource_version: u64,
}

impl MockApi {
    /// An object of `kind` in its list.
    pub fn with(mut self, kind: &'static str, object: Value) -> Self {
        self.items.entry(kind).or_default().push(object);
        self
    }

    /// The list of `kind` fails with `status` (403: RBAC does not grant it).
    pub fn failing(mut self, kind: &'static str, status: u16) -> Self {
        self.failing.insert(kind, status);
        self
    }

    /// `kind`'s CRD declares `plural` instead of the real one.
    pub fn plural(mut self, kind: &'static str, plural: &'static str) -> Self {
        self.plurals.insert(kind, plural);
        self
    }

    /// The writes received so far.
    pub fn writes(&self) -> Arc<Mutex<Vec<Write>>> {
        self.writes.clone()
    }

    /// A client of the mock, which serves until the client is dropped.
    pub fn client(self) -> Client {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(self.serve(handle));
        Client::new(service, "default")
    }

    fn resources(&self) -> impl Iterator<Item = (&'static str, &'static str, &'static str, bool)> + '_ {
        RESOURCES.iter().map(|&(gv, plural, kind, namespaced)| {
            (
                gv,
                self.plurals.get(kind).copied().unwrap_or(plural),
                kind,
                namespaced,
            )
        })
    }

    async fn serve(mut self, mut handle: mock::Handle<Request<Body>, Response<Body>>) {
        // Watches stay open (nothing changes): their senders are kept.
        let mut open = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or_default().to_string();
            if method == "GET" && query.contains("watch=true") && self.list_of(&path).is_some() {
                open.push(send);
                continue;
            }
            let apply = req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|t| t == "application/apply-patch+yaml");
            let body = json_body(req).await;
            send.send_response(self.answer(&method, &path, &query, body, apply));
        }
    }

    /// The kind listed at `path`, if `path` is a served list.
    fn list_of(&self, path: &str) -> Option<&'static str> {
        self.resources()
            .find(|(gv, plural, _, _)| path == format!("{gv}/{plural}"))
            .map(|(_, _, kind, _)| kind)
    }

    fn answer(&mut self, method: &str, path: &str, query: &str, body: Value, apply: bool) -> Response<Body> {
        if let Some((kind, namespace, name)) = self.namespaced_object(path) {
            // A real server answers a read of one object of any kind with the object or 404.
            if method == "GET"
                && let Some(name) = name
                && !path.ends_with("/status")
            {
                return match self.find(kind, namespace, name) {
                    Some(object) => respond(200, object.clone()),
                    None => status(404, "NotFound"),
                };
            }
        }
        if let Some((kind, namespace, name)) = self.namespaced_object(path)
            && STRICT.contains(&kind)
        {
            let name = name
                .map(str::to_string)
                .or_else(|| body.pointer("/metadata/name")?.as_str().map(String::from));
            return self.strict(method, (path, query), (kind, namespace, name), body, apply);
        }
        if method == "GET" {
            if let Some(kind) = self.list_of(path) {
                if let Some(&code) = self.failing.get(kind) {
                    return status(code, "Forbidden");
                }
                let items = self.items.get(kind).cloned().unwrap_or_default();
                let items: Vec<Value> = items
                    .into_iter()
                    .map(|mut o| {
                        o["metadata"]["resourceVersion"] = json!("1");
                        o
                    })
                    .collect();
                return respond(
                    200,
                    json!({"kind": format!("{kind}List"), "metadata": {"resourceVersion": "1"}, "items": items}),
                );
            }
            let served: Vec<Value> = self
                .resources()
                .filter(|(gv, ..)| *gv == path)
                .map(|(_, plural, kind, namespaced)| {
                    json!({"name": plural, "singularName": "", "namespaced": namespaced, "kind": kind,
                           "verbs": ["get", "list", "watch", "create", "patch", "delete"]})
                })
                .collect();
            if !served.is_empty() {
                let gv = path.trim_start_matches("/apis/").trim_start_matches("/api/");
                return respond(
                    200,
                    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": served}),
                );
            }
        }
        if method != "GET"
            && let Some((kind, namespace, name)) = self.namespaced_object(path)
        {
            self.writes.lock().unwrap_or_else(|e| e.into_inner()).push((
                method.to_string(),
                format!("{path}?{query}"),
                body.clone(),
            ));
            let status = path.ends_with("/status");
            let object = self.store(kind, namespace, name, status, body);
            return respond(200, object);
        }
        status(404, "NotFound")
    }

    /// Kind, namespace and name (if any) of `{gv}/namespaces/{ns}/{plural}[/{name}[/status]]`
    /// of a served namespaced kind.
    fn namespaced_object<'p>(&self, path: &'p str) -> Option<(&'static str, &'p str, Option<&'p str>)> {
        self.resources()
            .filter(|r| r.3)
            .find_map(|(gv, plural, kind, _)| {
                let rest = path.strip_prefix(gv)?.strip_prefix("/namespaces/")?;
                let parts: Vec<&str> = rest.split('/').collect();
                let shaped = parts.len() >= 2
                    && parts[1] == plural
                    && !parts[0].is_empty()
                    && (parts.len() <= 3 || (parts.len() == 4 && parts[3] == "status"));
                shaped.then(|| (kind, parts[0], parts.get(2).copied()))
            })
    }

    /// A request for one object of a [`STRICT`] kind.
    fn strict(
        &mut self,
        method: &str,
        (path, query): (&str, &str),
        (kind, namespace, name): (&'static str, &str, Option<String>),
        mut body: Value,
        apply: bool,
    ) -> Response<Body> {
        let kept = name
            .as_deref()
            .and_then(|n| self.find(kind, namespace, n))
            .cloned();
        match (method, &kept) {
            // One object was read above; a namespace's collection of them is not served.
            ("GET", _) => return status(404, "NotFound"),
            ("POST", Some(_)) => return status(409, "AlreadyExists"),
            ("PATCH", None) if !apply => return status(404, "NotFound"),
            ("POST" | "PATCH", _) => {}
            _ => return status(405, "MethodNotAllowed"),
        }
        self.writes.lock().unwrap_or_else(|e| e.into_inner()).push((
            method.to_string(),
            format!("{path}?{query}"),
            body.clone(),
        ));
        self.resource_version += 1;
        if !body.is_object() {
            body = json!({});
        }
        body["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        let object = self.store(kind, namespace, name.as_deref(), false, body);
        respond(if kept.is_some() { 200 } else { 201 }, object)
    }

    /// The kept object `kind` `namespace/name`, if any.
    fn find(&self, kind: &str, namespace: &str, name: &str) -> Option<&Value> {
        self.items
            .get(kind)?
            .iter()
            .find(|o| o["metadata"]["namespace"] == namespace && o["metadata"]["name"] == name)
    }

    /// Keeps a write of `kind` `namespace/name` and returns the object as it now is: a status
    /// write replaces only the status of the kept object, any other write merges into it (what
    /// lazyload writes are server-side applies and merge patches); a write to the collection
    /// (an Event) adds one.
    fn store(
        &mut self,
        kind: &'static str,
        namespace: &str,
        name: Option<&str>,
        status: bool,
        body: Value,
    ) -> Value {
        let mut written = if body.is_object() { body } else { json!({}) };
        written["metadata"]["namespace"] = json!(namespace);
        if let Some(name) = name {
            written["metadata"]["name"] = json!(name);
        }
        let items = self.items.entry(kind).or_default();
        let same = |o: &&mut Value| {
            name.is_some() && o["metadata"]["namespace"] == namespace && o["metadata"]["name"] == json!(name)
        };
        let Some(kept) = items.iter_mut().find(same) else {
            items.push(written.clone());
            return written;
        };
        if status {
            kept["status"] = written["status"].take();
        } else {
            merge(kept, written);
        }
        kept.clone()
    }
}

/// JSON merge patch (RFC 7386): `patch`'s fields replace `target`'s, `null` removes one.
fn merge(target: &mut Value, patch: Value) {
    match (target.as_object_mut(), patch) {
        (Some(fields), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    fields.remove(&key);
                } else {
                    merge(fields.entry(key).or_insert(Value::Null), value);
                }
            }
        }
        (_, patch) => *target = patch,
    }
}

/// An API server's answer: `code` with `body` as JSON (also for the tests that script their
/// server request by request).
pub fn json_response(code: u16, body: &Value) -> Response<Body> {
    respond(code, body.clone())
}

/// The JSON body of a request to the API server (`null` when it has none or is not JSON).
pub async fn json_body(req: Request<Body>) -> Value {
    match req.into_body().collect_bytes().await {
        Ok(b) => serde_json::from_slice(&b).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

fn respond(code: u16, body: Value) -> Response<Body> {
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    Response::builder()
        .status(code)
        .body(Body::from(bytes))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

fn status(code: u16, reason: &str) -> Response<Body> {
    respond(
        code,
        json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": reason,
               "message": format!("{reason} (mock API server)"), "code": code}),
    )
}

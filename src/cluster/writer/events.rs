//! Publishing Kubernetes Events about the objects lazyload reconciles.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};

/// Publishes Events through a recorder, or nowhere (tests, and runs without one). A failed
/// publish is logged and dropped: an Event is a courtesy, never a reason to retry a reconcile.
#[derive(Clone, Default)]
pub struct EventPublisher {
    recorder: Option<Recorder>,
}

impl EventPublisher {
    /// Publishes through `recorder` when given.
    pub fn new(recorder: Option<Recorder>) -> Self {
        Self { recorder }
    }

    /// Publishes one Event about `object` (action `Reconcile`).
    pub async fn publish(&self, object: &ObjectReference, type_: EventType, reason: &str, note: String) {
        let Some(recorder) = &self.recorder else { return };
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, object).await {
            tracing::debug!("publishing an event failed: {e}");
        }
    }
}

//! OpenTelemetry: the adapter that exports our `tracing` spans over OTLP and joins them to
//! the W3C trace context that messages carry, so a collector sees one trace per journey:
//! upstream → orchestrator → agent → orchestrator ...
//!
//! Configured only by the standard `OTEL_*` environment variables, as a fleet's other
//! services are: export is on when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set and `OTEL_SDK_DISABLED` is not `true`;
//! `OTEL_SERVICE_NAME` (or `service.name` in `OTEL_RESOURCE_ATTRIBUTES`) names the service,
//! `journeyman` otherwise. The transport is OTLP over HTTP with protobuf bodies: it rides
//! on the `reqwest` we already build, where gRPC would bring tonic and h2.
//!
//! The header format itself is `wire::trace` (pure); this module only converts between it
//! and OpenTelemetry's span contexts. Without an exporter every function here is a no-op
//! or a plain fallback to `wire::trace`, so the runtime calls them unconditionally.

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::wire::trace::TraceParent;

/// The service name when the environment gives none.
pub const DEFAULT_SERVICE_NAME: &str = "journeyman";

/// Why the exporter could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(
        "cannot set up the OTLP trace exporter (check OTEL_EXPORTER_OTLP_ENDPOINT and OTEL_EXPORTER_OTLP_PROTOCOL): {0}"
    )]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// Whether the environment asks for export: an endpoint is set and the SDK is not
/// disabled. A pure function of a variable lookup, so it is tested without touching the
/// process environment.
pub fn export_wanted(var: impl Fn(&str) -> Option<String>) -> bool {
    let set = |k: &str| var(k).is_some_and(|v| !v.trim().is_empty());
    let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The exporting pipeline: keep it for the life of the process and call
/// [`Pipeline::shutdown`] before exiting, or the last batch of spans is lost.
#[derive(Debug)]
pub struct Pipeline {
    /// Owns the batch processor (a thread of its own) and the exporter.
    provider: SdkTracerProvider,
}

impl Pipeline {
    /// The pipeline the environment asks for, or `None` when export is off.
    pub fn from_env() -> Result<Option<Self>, TelemetryError> {
        if !export_wanted(|k| std::env::var(k).ok()) {
            return Ok(None);
        }
        // Endpoint, protocol, headers, timeout and compression come from OTEL_EXPORTER_OTLP_*.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource())
            .build();
        Ok(Some(Self { provider }))
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans for this pipeline.
    pub fn layer<S>(&self) -> tracing_opentelemetry::OpenTelemetryLayer<S, SdkTracer>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("journeyman"))
    }

    /// Exports what is buffered and stops the exporter. Blocks for at most the export
    /// timeout: call it once the work is done, before the process exits.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("warning: exporting the last traces failed: {e}");
        }
    }
}

/// The resource every span carries: the environment's (`OTEL_SERVICE_NAME`,
/// `OTEL_RESOURCE_ATTRIBUTES`), with our service name when it names none (the SDK's own
/// default, `unknown_service`, would hide us among other services).
fn resource() -> Resource {
    let from_env = Resource::builder().build();
    let named = from_env
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|v| !v.as_str().starts_with("unknown_service"));
    if named {
        from_env
    } else {
        Resource::builder()
            .with_service_name(DEFAULT_SERVICE_NAME)
            .build()
    }
}

/// The OpenTelemetry span context a `traceparent` names, as a remote parent.
fn span_context(t: &TraceParent) -> Option<SpanContext> {
    let trace_id = TraceId::from_hex(&t.trace_id).ok()?;
    let span_id = SpanId::from_hex(&t.span_id).ok()?;
    let flags = if t.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let cx = SpanContext::new(trace_id, span_id, flags, true, TraceState::default());
    cx.is_valid().then_some(cx)
}

/// Makes `span` a child of the sender's span, so the exported trace links across the
/// broker. Call it before the span is first entered (OpenTelemetry fixes a span's parent
/// when it starts). Without an exporter it does nothing.
pub fn set_remote_parent(span: &tracing::Span, parent: &TraceParent) {
    if let Some(sc) = span_context(parent) {
        // Errors mean no OpenTelemetry layer (export off) or a span filtered out: nothing
        // to link then.
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
    }
}

/// The trace id of `span` when it is exported (`None` without an exporter): a journey
/// started without a `traceparent` takes the trace of the span that started it.
pub fn trace_id_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The `traceparent` for a message sent in the trace `trace_id` from the current span:
/// the current span itself when it is exported and in that trace, so the receiver's span
/// becomes its child; otherwise a fresh span id in the same trace (`wire::trace`).
pub fn next_hop(trace_id: &str) -> TraceParent {
    let cx = tracing::Span::current().context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() && sc.trace_id().to_string() == trace_id {
        TraceParent {
            trace_id: trace_id.to_string(),
            span_id: sc.span_id().to_string(),
            sampled: sc.is_sampled(),
        }
    } else {
        TraceParent::child_of(trace_id)
    }
}

/// The `traceparent` for a message answering one that carried `parent`: see [`next_hop`].
pub fn reply_hop(parent: &TraceParent) -> TraceParent {
    let mut next = next_hop(&parent.trace_id);
    if next.span_id == parent.span_id {
        next = parent.child();
    }
    next.sampled = parent.sampled;
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_is_on_with_an_endpoint_unless_the_sdk_is_disabled() {
        fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
            move |k| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        }
        let e = "OTEL_EXPORTER_OTLP_ENDPOINT";
        let t = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
        assert!(!export_wanted(env(&[])));
        assert!(!export_wanted(env(&[(e, " ")])));
        assert!(export_wanted(env(&[(e, "http://c:4318")])));
        assert!(export_wanted(env(&[(t, "http://c:4318/v1/traces")])));
        assert!(!export_wanted(env(&[
            (e, "http://c:4318"),
            ("OTEL_SDK_DISABLED", "TRUE")
        ])));
        assert!(export_wanted(env(&[
            (e, "http://c:4318"),
            ("OTEL_SDK_DISABLED", "false")
        ])));
    }

    #[test]
    fn without_an_exporter_hops_fall_back_to_fresh_spans_in_the_trace() {
        let parent = TraceParent::new_root();
        let next = next_hop(&parent.trace_id);
        assert_eq!(next.trace_id, parent.trace_id);
        assert_ne!(next.span_id, parent.span_id);
        let reply = reply_hop(&parent);
        assert_eq!(reply.trace_id, parent.trace_id);
        assert_ne!(reply.span_id, parent.span_id);
        assert!(span_context(&parent).is_some_and(|c| c.is_remote()));
        assert_eq!(trace_id_of(&tracing::Span::none()), None);
    }

    #[test]
    fn a_span_under_the_layer_takes_the_remote_parent_and_hands_itself_on() {
        use tracing_subscriber::layer::SubscriberExt;
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let upstream = TraceParent::new_root();
            let span = tracing::info_span!("message");
            set_remote_parent(&span, &upstream);
            assert_eq!(
                trace_id_of(&span).as_deref(),
                Some(upstream.trace_id.as_str())
            );
            let _g = span.enter();
            let next = next_hop(&upstream.trace_id);
            assert_eq!(next.trace_id, upstream.trace_id);
            assert_ne!(next.span_id, upstream.span_id);
            let own = span.context().span().span_context().span_id().to_string();
            assert_eq!(next.span_id, own, "the next hop's parent is this span");
            // Another trace (a journey started elsewhere): a fresh span in that trace.
            let other = TraceParent::new_root();
            assert_ne!(next_hop(&other.trace_id).span_id, own);
        });
    }
}

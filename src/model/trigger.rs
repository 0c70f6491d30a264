//! The trigger message, version 1: what asks for a run. `sigrun submit` publishes one, and so does
//! any event producer, in another language or not — as plain JSON (`application/json`) or wrapped
//! in a CloudEvents 1.0 structured-mode event (`application/cloudevents+json`, or a JSON body with
//! `specversion`) whose `data` is the plain trigger. Documented as JSON Schema in
//! `schemas/trigger-v1.schema.json`. Parsing is strict and pure: an oversized body, one that is not
//! JSON, another version, an unknown field or a bad value is an error naming the field and the
//! value, and the workers park such a trigger with that reason at once.
//!
//! The run a trigger asks for is named by [`run_id`] — a UUID v5 of pipeline and version — so
//! duplicate triggers for one pipeline and version name one run.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::envelope::Stage;
use super::ids::{GalleryImageVersionId, version_name_ok};

pub const TRIGGER_VERSION: u32 = 1;
/// Larger bodies are refused: a trigger is a few fields and, at most, one pipeline spec's text.
pub const MAX_TRIGGER_BYTES: usize = 256 * 1024;
/// The CloudEvents `type` of a trigger.
pub const CLOUDEVENT_TYPE: &str = "io.sigrun.trigger.v1";
pub const CONTENT_TYPE_JSON: &str = "application/json";
pub const CONTENT_TYPE_CLOUDEVENTS: &str = "application/cloudevents+json";

/// A request for a run of one pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    /// Always [`TRIGGER_VERSION`].
    pub v: u32,
    /// The pipeline spec's `name`.
    pub pipeline: String,
    /// The version to publish or roll out; absent: the pipeline's version scheme decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The stage the run starts at (as `sigrun submit --from`); absent: what the plan needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Stage>,
    /// Roll out this existing gallery image version (ARM id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_version_id: Option<String>,
    /// The pipeline spec's TOML text; absent: the workers' `[pipelines] dir` has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<String>,
}

/// The CloudEvents attributes a trigger arrived with (kept for logs and history).
#[derive(Debug, Clone, PartialEq)]
pub struct CloudEventInfo {
    pub id: String,
    pub source: String,
    pub time: Option<String>,
    pub subject: Option<String>,
    /// The Distributed Tracing extension's `traceparent`: the run joins the producer's trace.
    pub traceparent: Option<String>,
}

/// A parsed trigger and, when it came as a CloudEvent, the event's attributes.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedTrigger {
    pub trigger: Trigger,
    pub cloud_event: Option<CloudEventInfo>,
}

/// Why a message is not a trigger. Each names what was wrong and, where there is one, the value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TriggerError {
    #[error("trigger of {0} bytes is over the limit of {MAX_TRIGGER_BYTES}")]
    TooLarge(usize),
    #[error("content type `{0}` is not a trigger's: publish `{CONTENT_TYPE_JSON}` or `{CONTENT_TYPE_CLOUDEVENTS}`")]
    ContentType(String),
    #[error("trigger is not JSON: {0}")]
    NotJson(String),
    #[error("trigger has version {0}; this build reads version {TRIGGER_VERSION}")]
    WrongVersion(String),
    /// A field of the trigger is missing, unknown, of the wrong type or has a bad value.
    #[error("trigger field `{field}`: {message}")]
    Field { field: String, message: String },
    /// A CloudEvents attribute is missing or wrong.
    #[error("CloudEvents attribute `{attribute}`: {message}")]
    CloudEvent { attribute: String, message: String },
}

fn field(name: &str, message: impl Into<String>) -> TriggerError {
    TriggerError::Field {
        field: name.to_string(),
        message: message.into(),
    }
}

fn attribute(name: &str, message: impl Into<String>) -> TriggerError {
    TriggerError::CloudEvent {
        attribute: name.to_string(),
        message: message.into(),
    }
}

/// The run a pipeline and version name: the same pair is always the same run.
pub fn run_id(pipeline: &str, version: &str) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("sigrun:{pipeline}:{version}").as_bytes())
}

/// A spec's `name` rule, shared by triggers: 1–40 lower-case letters, digits and dashes.
pub fn pipeline_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

impl Trigger {
    /// A plain trigger for `pipeline` with nothing else set.
    pub fn new(pipeline: &str) -> Trigger {
        Trigger {
            v: TRIGGER_VERSION,
            pipeline: pipeline.to_string(),
            version: None,
            from: None,
            image_version_id: None,
            spec: None,
        }
    }

    /// The plain JSON form (content type [`CONTENT_TYPE_JSON`]).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("triggers serialize")
    }

    /// Value checks beyond the types (`prefix` names where the trigger sits: `data.` in a
    /// CloudEvent).
    fn check(&self, prefix: &str) -> Result<(), TriggerError> {
        let name = |f: &str| format!("{prefix}{f}");
        if !pipeline_name_ok(&self.pipeline) {
            return Err(field(
                &name("pipeline"),
                format!("`{}`: 1–40 lower-case letters, digits and dashes", self.pipeline),
            ));
        }
        if let Some(version) = &self.version
            && !version_name_ok(version)
        {
            return Err(field(
                &name("version"),
                format!("`{version}` must be Major.Minor.Patch with 32-bit integer parts"),
            ));
        }
        if self.from == Some(Stage::Verify) {
            return Err(field(
                &name("from"),
                "`verify`: a run cannot start at verify; start at pool-create",
            ));
        }
        if let Some(id) = &self.image_version_id {
            let parsed =
                GalleryImageVersionId::parse(id).map_err(|e| field(&name("image_version_id"), e.to_string()))?;
            if let Some(version) = &self.version
                && version != parsed.name()
            {
                return Err(field(
                    &name("version"),
                    format!(
                        "`{version}` differs from the version `{}` that image_version_id names",
                        parsed.name()
                    ),
                ));
            }
        }
        if let Some(spec) = &self.spec
            && spec.trim().is_empty()
        {
            return Err(field(
                &name("spec"),
                "empty; leave it out to use the workers' pipelines",
            ));
        }
        Ok(())
    }
}

/// Parses a message body as a trigger: checks the size, picks plain or CloudEvents by the content
/// type (or, without a telling one, by a `specversion` member), then the fields and their values.
pub fn parse(body: &[u8], content_type: Option<&str>) -> Result<ReceivedTrigger, TriggerError> {
    if body.len() > MAX_TRIGGER_BYTES {
        return Err(TriggerError::TooLarge(body.len()));
    }
    let media = content_type.map(media_type).filter(|c| !c.is_empty());
    let structured = match media.as_deref() {
        Some(CONTENT_TYPE_CLOUDEVENTS) => Some(true),
        None | Some(CONTENT_TYPE_JSON) => None,
        Some("application/cloudevents-batch+json") => {
            return Err(TriggerError::ContentType(
                "application/cloudevents-batch+json (one event per message, please)".into(),
            ));
        }
        Some(other) => return Err(TriggerError::ContentType(other.to_string())),
    };
    let value: Value = serde_json::from_slice(body).map_err(|e| TriggerError::NotJson(e.to_string()))?;
    let Value::Object(object) = value else {
        return Err(TriggerError::NotJson(format!(
            "a trigger is a JSON object, not {}",
            kind_of(&value)
        )));
    };
    if structured.unwrap_or_else(|| object.contains_key("specversion")) {
        cloud_event(object)
    } else {
        Ok(ReceivedTrigger {
            trigger: plain(object, "")?,
            cloud_event: None,
        })
    }
}

/// The plain trigger in `object`; `prefix` is prepended to field names in errors.
fn plain(object: Map<String, Value>, prefix: &str) -> Result<Trigger, TriggerError> {
    match object.get("v") {
        None => {
            return Err(field(
                &format!("{prefix}v"),
                format!("missing; must be {TRIGGER_VERSION}"),
            ));
        }
        Some(Value::Number(n)) if n.as_u64() == Some(u64::from(TRIGGER_VERSION)) => {}
        Some(Value::Number(n)) => return Err(TriggerError::WrongVersion(n.to_string())),
        Some(other) => {
            return Err(field(
                &format!("{prefix}v"),
                format!("must be the number {TRIGGER_VERSION}, not {}", kind_of(other)),
            ));
        }
    }
    let trigger: Trigger = serde_path_to_error::deserialize(Value::Object(object)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde_json's own text ends with a position that means nothing in an already-parsed value.
        let message = inner.split(" at line ").next().unwrap_or(&inner).to_string();
        let name = if path == "." {
            // Unknown and missing fields: the message names the field.
            unknown_or_missing(&message).unwrap_or_else(|| "(trigger)".into())
        } else {
            path
        };
        field(&format!("{prefix}{name}"), message)
    })?;
    trigger.check(prefix)?;
    Ok(trigger)
}

/// The field an "unknown field `x`" or "missing field `x`" message is about.
fn unknown_or_missing(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("missing field `"))?;
    rest.split('`').next().map(str::to_string)
}

/// A CloudEvents 1.0 structured-mode event (JSON format) carrying a trigger in `data`. An event
/// wrong in several ways is refused for the first fault in this order: context attributes,
/// `data_base64`, extension attributes, `data`, then the trigger in it.
fn cloud_event(mut object: Map<String, Value>) -> Result<ReceivedTrigger, TriggerError> {
    let info = context_attributes(&object)?;
    if object.contains_key("data_base64") {
        return Err(attribute(
            "data_base64",
            "not accepted: put the trigger JSON itself in `data`",
        ));
    }
    extension_attributes(&object)?;
    let data = trigger_data(object.remove("data"))?;
    Ok(ReceivedTrigger {
        trigger: plain(data, "data.")?,
        cloud_event: Some(info),
    })
}

/// The members CloudEvents 1.0 defines for a structured-mode JSON event (`data_base64` aside,
/// which is refused on its own); any other member is an extension attribute.
const CLOUDEVENT_MEMBERS: [&str; 9] = [
    "specversion",
    "id",
    "source",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
    "data",
];

/// The context attributes: the required ones present and non-empty, each one a string, and the
/// values a trigger depends on (`specversion`, `type`, `datacontenttype`, `time`) checked.
fn context_attributes(object: &Map<String, Value>) -> Result<CloudEventInfo, TriggerError> {
    let specversion = required_text(object, "specversion")?;
    if specversion != "1.0" {
        return Err(attribute(
            "specversion",
            format!("`{specversion}`: only \"1.0\" is read"),
        ));
    }
    let id = required_text(object, "id")?;
    let source = required_text(object, "source")?;
    let kind = required_text(object, "type")?;
    if kind != CLOUDEVENT_TYPE {
        return Err(attribute(
            "type",
            format!("`{kind}`: a trigger's type is `{CLOUDEVENT_TYPE}`"),
        ));
    }
    if let Some(content_type) = optional_text(object, "datacontenttype")? {
        data_content_type(&content_type)?;
    }
    let time = optional_text(object, "time")?;
    if let Some(t) = &time
        && time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).is_err()
    {
        return Err(attribute("time", format!("`{t}` is not an RFC 3339 timestamp")));
    }
    let subject = optional_text(object, "subject")?;
    let traceparent = optional_text(object, "traceparent")?;
    // Not kept, but a `dataschema` that is not a string is still a malformed event.
    optional_text(object, "dataschema")?;
    Ok(CloudEventInfo {
        id,
        source,
        time,
        subject,
        traceparent,
    })
}

/// A required attribute: present, a string, not empty.
fn required_text(object: &Map<String, Value>, name: &str) -> Result<String, TriggerError> {
    match object.get(name) {
        None | Some(Value::Null) => Err(attribute(name, "missing (required by CloudEvents 1.0)")),
        Some(Value::String(s)) if s.is_empty() => Err(attribute(name, "empty")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(attribute(name, format!("must be a string, not {}", kind_of(other)))),
    }
}

/// An optional attribute: absent (or null), or a string.
fn optional_text(object: &Map<String, Value>, name: &str) -> Result<Option<String>, TriggerError> {
    match object.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(attribute(name, format!("must be a string, not {}", kind_of(other)))),
    }
}

/// `datacontenttype`, when given, must say the data is plain JSON (parameters aside).
fn data_content_type(content_type: &str) -> Result<(), TriggerError> {
    if media_type(content_type) != CONTENT_TYPE_JSON {
        return Err(attribute(
            "datacontenttype",
            format!("`{content_type}`: the data must be `{CONTENT_TYPE_JSON}`"),
        ));
    }
    Ok(())
}

/// Extension attributes: CloudEvents 1.0 names are lower-case letters and digits, and their values
/// are scalars.
fn extension_attributes(object: &Map<String, Value>) -> Result<(), TriggerError> {
    for (name, value) in object {
        if CLOUDEVENT_MEMBERS.contains(&name.as_str()) {
            continue;
        }
        let name_ok = !name.is_empty() && name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !name_ok {
            return Err(attribute(
                name,
                "not a CloudEvents attribute name (lower-case letters and digits only)",
            ));
        }
        if matches!(value, Value::Object(_) | Value::Array(_)) {
            return Err(attribute(
                name,
                format!(
                    "an extension attribute's value is a string, number or boolean, not {}",
                    kind_of(value)
                ),
            ));
        }
    }
    Ok(())
}

/// The event's `data`: the trigger, as a JSON object.
fn trigger_data(data: Option<Value>) -> Result<Map<String, Value>, TriggerError> {
    match data {
        None | Some(Value::Null) => Err(attribute("data", "missing: it carries the trigger")),
        Some(Value::Object(data)) => Ok(data),
        Some(other) => Err(attribute(
            "data",
            format!("must be the trigger as a JSON object, not {}", kind_of(&other)),
        )),
    }
}

/// The media type without parameters (`; charset=utf-8`), lower-cased: media types are
/// case-insensitive.
fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const VERSION_ID: &str = "/subscriptions/11111111-1111-4111-8111-111111111111/resourceGroups/rg-gallery/providers/Microsoft.Compute/galleries/g/images/d/versions/1.2.3";

    fn parse_json(value: Value, content_type: Option<&str>) -> Result<ReceivedTrigger, TriggerError> {
        parse(&serde_json::to_vec(&value).unwrap(), content_type)
    }

    fn event(data: Value) -> Value {
        json!({
            "specversion": "1.0",
            "type": CLOUDEVENT_TYPE,
            "source": "/ci/image-build",
            "id": "9b0f",
            "time": "2026-11-27T02:00:00Z",
            "datacontenttype": "application/json",
            "data": data,
        })
    }

    fn field_of(error: TriggerError) -> String {
        match error {
            TriggerError::Field { field, .. } => field,
            other => panic!("not a field error: {other}"),
        }
    }

    #[test]
    fn a_plain_trigger_round_trips() {
        let mut trigger = Trigger::new("nightly-ubuntu");
        trigger.version = Some("2026.1127.0".into());
        trigger.from = Some(Stage::GalleryPublish);
        trigger.spec = Some("name = \"nightly-ubuntu\"\n".into());
        let parsed = parse(&trigger.encode(), Some("application/json")).unwrap();
        assert_eq!(parsed.trigger, trigger);
        assert_eq!(parsed.cloud_event, None);
        // The minimal trigger, and one without a content type at all.
        let parsed = parse_json(json!({"v": 1, "pipeline": "nightly-ubuntu"}), None).unwrap();
        assert_eq!(parsed.trigger, Trigger::new("nightly-ubuntu"));
        let encoded: Value = serde_json::from_slice(&Trigger::new("p").encode()).unwrap();
        assert_eq!(encoded, json!({"v": 1, "pipeline": "p"}), "absent options are left out");
    }

    #[test]
    fn a_cloud_event_carries_a_trigger_and_is_detected_either_way() {
        let data = json!({"v": 1, "pipeline": "nightly-ubuntu", "from": "gallery-publish"});
        for content_type in [
            Some("application/cloudevents+json; charset=utf-8"),
            Some("application/json"),
            None,
        ] {
            let parsed = parse_json(event(data.clone()), content_type).unwrap();
            assert_eq!(parsed.trigger.pipeline, "nightly-ubuntu");
            assert_eq!(parsed.trigger.from, Some(Stage::GalleryPublish));
            let info = parsed.cloud_event.expect("a CloudEvent");
            assert_eq!(info.id, "9b0f");
            assert_eq!(info.source, "/ci/image-build");
            assert_eq!(info.time.as_deref(), Some("2026-11-27T02:00:00Z"));
        }
        // Extension attributes are allowed.
        let mut with_extension = event(data.clone());
        with_extension["traceparent"] = json!("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        let info = parse_json(with_extension, None).unwrap().cloud_event.unwrap();
        assert_eq!(
            info.traceparent.as_deref(),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
        // A plain trigger announced as a CloudEvent is not one.
        let err = parse_json(data, Some(CONTENT_TYPE_CLOUDEVENTS)).unwrap_err();
        assert_eq!(
            err,
            TriggerError::CloudEvent {
                attribute: "specversion".into(),
                message: "missing (required by CloudEvents 1.0)".into()
            }
        );
    }

    #[test]
    fn cloud_event_attributes_are_checked() {
        let data = json!({"v": 1, "pipeline": "p"});
        let cases: Vec<(&str, Value, &str)> = vec![
            ("specversion", json!("0.3"), "`0.3`"),
            ("id", json!(""), "empty"),
            ("id", Value::Null, "missing"),
            ("source", json!(7), "must be a string, not a number"),
            ("type", json!("com.example.build"), "`com.example.build`"),
            ("datacontenttype", json!("application/xml"), "`application/xml`"),
            ("time", json!("yesterday"), "`yesterday`"),
            ("data", json!("{\"v\":1}"), "not a string"),
            ("Bad-Name", json!("x"), "lower-case"),
            ("ext", json!({"a": 1}), "not an object"),
            ("data_base64", json!("eyJ2IjoxfQ=="), "not accepted"),
        ];
        for (name, value, expected) in cases {
            let mut event = event(data.clone());
            event[name] = value;
            match parse_json(event, None) {
                Err(TriggerError::CloudEvent { attribute, message }) => {
                    assert_eq!(attribute, name);
                    assert!(message.contains(expected), "{name}: {message}");
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        let mut no_data = event(data);
        no_data.as_object_mut().unwrap().remove("data");
        assert!(matches!(
            parse_json(no_data, None),
            Err(TriggerError::CloudEvent { attribute, .. }) if attribute == "data"
        ));
        // The data's own fields are named as such.
        let err = parse_json(event(json!({"v": 1, "pipeline": "Nightly"})), None).unwrap_err();
        assert_eq!(field_of(err), "data.pipeline");
    }

    #[test]
    fn bad_fields_are_named_with_their_values() {
        let cases: Vec<(Value, &str, &str)> = vec![
            (json!({"v": 1, "pipline": "p"}), "pipline", "unknown field"),
            (json!({"v": 1}), "pipeline", "missing field"),
            (json!({"v": 1, "pipeline": 3}), "pipeline", "invalid type"),
            (
                json!({"v": 1, "pipeline": "Nightly Ubuntu"}),
                "pipeline",
                "`Nightly Ubuntu`",
            ),
            (json!({"v": 1, "pipeline": "p", "version": "1.2"}), "version", "`1.2`"),
            (json!({"v": 1, "pipeline": "p", "from": "deploy"}), "from", "`deploy`"),
            (
                json!({"v": 1, "pipeline": "p", "from": "verify"}),
                "from",
                "cannot start at verify",
            ),
            (
                json!({"v": 1, "pipeline": "p", "image_version_id": "/subscriptions/x"}),
                "image_version_id",
                "/subscriptions/x",
            ),
            (
                json!({"v": 1, "pipeline": "p", "image_version_id": VERSION_ID, "version": "1.2.4"}),
                "version",
                "`1.2.3`",
            ),
            (json!({"v": 1, "pipeline": "p", "spec": " "}), "spec", "empty"),
            (json!({"pipeline": "p"}), "v", "missing"),
        ];
        for (value, name, expected) in cases {
            match parse_json(value.clone(), None) {
                Err(TriggerError::Field { field, message }) => {
                    assert_eq!(field, name, "{value}: {message}");
                    assert!(message.contains(expected), "{value}: {message}");
                    assert!(!message.contains(" at line "), "{message}");
                }
                other => panic!("{value}: {other:?}"),
            }
        }
        let ok = parse_json(
            json!({"v": 1, "pipeline": "p", "image_version_id": VERSION_ID, "version": "1.2.3"}),
            None,
        );
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn size_json_version_and_content_type_are_checked_first() {
        let big = vec![b' '; MAX_TRIGGER_BYTES + 1];
        assert_eq!(parse(&big, None), Err(TriggerError::TooLarge(MAX_TRIGGER_BYTES + 1)));
        assert!(matches!(parse(b"{\"v\":1,", None), Err(TriggerError::NotJson(_))));
        assert!(matches!(parse(b"[1]", None), Err(TriggerError::NotJson(m)) if m.contains("an array")));
        assert_eq!(
            parse(br#"{"v":2,"pipeline":"p"}"#, None),
            Err(TriggerError::WrongVersion("2".into()))
        );
        assert_eq!(
            parse(br#"{"v":"1","pipeline":"p"}"#, None),
            Err(TriggerError::Field {
                field: "v".into(),
                message: "must be the number 1, not a string".into()
            })
        );
        assert_eq!(
            parse(br#"{"v":1,"pipeline":"p"}"#, Some("text/plain")),
            Err(TriggerError::ContentType("text/plain".into()))
        );
        let err = parse(br#"[]"#, Some("application/cloudevents-batch+json")).unwrap_err();
        assert!(err.to_string().contains("one event per message"), "{err}");
    }

    #[test]
    fn the_run_id_follows_from_pipeline_and_version() {
        assert_eq!(run_id("p", "1.0.0"), run_id("p", "1.0.0"));
        assert_ne!(run_id("p", "1.0.0"), run_id("p", "1.0.1"));
        assert_ne!(run_id("p", "1.0.0"), run_id("q", "1.0.0"));
        // The value is part of the contract (producers may compute it): keep it stable.
        assert_eq!(
            run_id("nightly-ubuntu", "2026.1126.3"),
            Uuid::new_v5(&Uuid::NAMESPACE_URL, b"sigrun:nightly-ubuntu:2026.1126.3")
        );
    }

    #[test]
    fn the_json_schema_describes_the_trigger() {
        let schema: Value = serde_json::from_str(include_str!("../../schemas/trigger-v1.schema.json")).unwrap();
        let mut full = Trigger::new("p");
        full.version = Some("1.2.3".into());
        full.from = Some(Stage::PoolCreate);
        full.image_version_id = Some(VERSION_ID.into());
        full.spec = Some("name = \"p\"".into());
        let encoded: Value = serde_json::from_slice(&full.encode()).unwrap();
        let declared = schema["$defs"]["trigger"]["properties"].as_object().unwrap();
        for key in encoded.as_object().unwrap().keys() {
            assert!(declared.contains_key(key), "schema lacks `{key}`");
        }
        for key in declared.keys() {
            assert!(encoded.get(key).is_some(), "schema has `{key}`, the trigger does not");
        }
        let required: Vec<&str> = schema["$defs"]["trigger"]["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        assert_eq!(required, ["v", "pipeline"]);
        let stages: Vec<&str> = declared["from"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        let startable: Vec<&str> = Stage::ALL[..5].iter().map(|s| s.as_str()).collect();
        assert_eq!(stages, startable);
        let event = &schema["$defs"]["cloudevent"];
        assert_eq!(event["properties"]["type"]["const"], CLOUDEVENT_TYPE);
        assert_eq!(event["properties"]["data"]["$ref"], "#/$defs/trigger");
    }
}

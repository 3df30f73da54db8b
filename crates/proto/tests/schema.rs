//! The schema's two encodings: protobuf round trips, and JSON follows the proto3 JSON rules
//! and tolerates what a newer writer adds.
use prost::Message;
use proto::v1::{
    Actor, Envelope, InvocationCompleted, OAuthSettings, RegistrationMode, ServerAdded, actor,
    envelope::Event,
};

fn server_added() -> Envelope {
    Envelope {
        event_id: "0193a5b2-7c1e-7000-8000-000000000001".to_owned(),
        occurred_at: Some(proto::Timestamp {
            seconds: 1_793_491_200,
            nanos: 500_000_000,
        }),
        actor: Some(Actor {
            kind: Some(actor::Kind::UserId("alice@example.com".to_owned())),
        }),
        correlation_id: "c-1".to_owned(),
        causation_id: String::new(),
        schema_version: proto::SCHEMA_VERSION,
        write_id: String::new(),
        event: Some(Event::ServerAdded(ServerAdded {
            server_id: "s1".to_owned(),
            name: "Production GitHub".to_owned(),
            slug: "production_github".to_owned(),
            url: "https://mcp.example.com/mcp".to_owned(),
            oauth: Some(OAuthSettings {
                scopes: vec!["repo".to_owned()],
                registration_mode: RegistrationMode::Dynamic as i32,
                client_id: String::new(),
            }),
            enabled: true,
            ..Default::default()
        })),
    }
}

#[test]
fn envelopes_round_trip_through_protobuf() {
    let envelope = server_added();
    let decoded = Envelope::decode(envelope.encode_to_vec().as_slice()).expect("decode");
    assert_eq!(decoded, envelope);
}

#[test]
fn json_follows_the_proto3_mapping() {
    let json = serde_json::to_value(server_added()).expect("to json");
    assert_eq!(json["eventId"], "0193a5b2-7c1e-7000-8000-000000000001");
    // RFC 3339 in UTC. pbjson writes the offset as `+00:00` where the proto3 JSON guide shows
    // `Z`; both are the same RFC 3339 instant and every proto3 JSON parser reads either.
    assert_eq!(json["occurredAt"], "2026-11-01T00:00:00.500+00:00");
    assert_eq!(json["actor"]["userId"], "alice@example.com");
    assert_eq!(json["schemaVersion"], 1);
    assert_eq!(json["serverAdded"]["name"], "Production GitHub");
    assert_eq!(
        json["serverAdded"]["oauth"]["registrationMode"],
        "REGISTRATION_MODE_DYNAMIC"
    );
    assert!(
        json.get("causationId").is_none(),
        "default values are left out"
    );

    let completed = Envelope {
        event: Some(Event::InvocationCompleted(InvocationCompleted {
            invocation_id: "i1".to_owned(),
            duration_ms: 12,
            result_size_bytes: 5_000_000_000,
            ..Default::default()
        })),
        ..server_added()
    };
    let json = serde_json::to_value(&completed).expect("to json");
    assert_eq!(
        json["invocationCompleted"]["resultSizeBytes"], "5000000000",
        "64-bit integers are strings in proto3 JSON"
    );
    let back: Envelope = serde_json::from_value(json).expect("from json");
    assert_eq!(back, completed);
}

#[test]
fn json_from_a_newer_writer_is_read_without_its_unknown_parts() {
    let json = serde_json::json!({
        "eventId": "0193a5b2-7c1e-7000-8000-000000000002",
        "occurredAt": "2026-11-05T00:00:00Z",
        "schemaVersion": 2,
        "someFutureEnvelopeField": true,
        "serverRenamedByRobots": {"serverId": "s1"}
    });
    let envelope: Envelope = serde_json::from_value(json).expect("newer JSON still reads");
    assert_eq!(envelope.schema_version, 2);
    assert!(
        envelope.event.is_none(),
        "an unknown event type leaves the body empty"
    );

    let json = serde_json::json!({
        "eventId": "e",
        "toolPermissionSet": {"toolName": "t", "state": "TOOL_STATE_FROM_THE_FUTURE"}
    });
    let envelope: Envelope = serde_json::from_value(json).expect("unknown enum value reads");
    match envelope.event {
        Some(Event::ToolPermissionSet(set)) => assert_eq!(set.state, 0, "reads as unspecified"),
        other => panic!("expected ToolPermissionSet, got {other:?}"),
    }
}

#[test]
fn every_event_knows_its_schema_name() {
    let event = Event::ServerAdded(ServerAdded::default());
    assert_eq!(event.type_name(), "ServerAdded");
    let json = serde_json::to_value(Envelope {
        event: Some(Event::InvocationCompleted(InvocationCompleted::default())),
        ..Default::default()
    })
    .expect("to json");
    assert!(json.get("invocationCompleted").is_some());
}

#[test]
fn no_field_is_ever_renumbered_or_removed() {
    let generated: std::collections::BTreeSet<&str> =
        include_str!(concat!(env!("OUT_DIR"), "/field_numbers.txt"))
            .lines()
            .collect();
    let locked: std::collections::BTreeSet<&str> =
        include_str!("../../../proto/field_numbers.lock")
            .lines()
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .collect();
    let gone: Vec<_> = locked.difference(&generated).collect();
    assert!(
        gone.is_empty(),
        "fields were renumbered, renamed or removed; the wire contract forbids it \
         (add new fields with new numbers instead): {gone:#?}"
    );
    let new: Vec<_> = generated.difference(&locked).collect();
    assert!(
        new.is_empty(),
        "new fields: append these lines to proto/field_numbers.lock: {new:#?}"
    );
}

#[test]
fn the_list_of_type_names_is_the_schema() {
    let oneof_fields = include_str!(concat!(env!("OUT_DIR"), "/field_numbers.txt"))
        .lines()
        .filter(|line| line.starts_with("switchboard.v1.Envelope."))
        .filter(|line| {
            line.rsplit(" = ")
                .next()
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| n >= 20)
        })
        .count();
    assert_eq!(Event::TYPE_NAMES.len(), oneof_fields);
    for name in Event::TYPE_NAMES {
        // proto3 JSON names the oneof field in lowerCamelCase of its message.
        let key = format!("{}{}", name[..1].to_lowercase(), &name[1..]);
        let envelope: Envelope =
            serde_json::from_value(serde_json::json!({ key: {} })).expect("known type");
        assert_eq!(envelope.event.map(|e| e.type_name()), Some(name));
    }
}

//! The simulated lead database: enough of the Lead Database API for
//! clients and tests to do real work through the proxy, and the rows of
//! the export files the bulk queues ([`super::bulk`]) write.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

/// A lead is a bag of fields, like Marketo's.
pub type Lead = Map<String, Value>;

/// Fields every lead has, in the order Marketo lists them.
pub(crate) const DEFAULT_FIELDS: [&str; 6] =
    ["id", "updatedAt", "lastName", "email", "createdAt", "firstName"];

pub(crate) struct LeadStore {
    leads: BTreeMap<u64, Lead>,
    next_id: u64,
}

/// An answer of the lead endpoints: `Ok(result)` or a Marketo error.
pub(crate) type LeadAnswer = Result<Value, (&'static str, String)>;

impl LeadStore {
    /// A store with `count` deterministic leads, ids 1..=count.
    pub fn seeded(count: u64) -> Self {
        let mut store = Self {
            leads: BTreeMap::new(),
            next_id: 1,
        };
        for _ in 0..count {
            let id = store.next_id;
            let mut lead = Lead::new();
            lead.insert("email".into(), json!(format!("lead{id}@example.com")));
            lead.insert("firstName".into(), json!(format!("First{id}")));
            lead.insert("lastName".into(), json!(format!("Last{id}")));
            store.insert(lead);
        }
        store
    }

    fn insert(&mut self, mut lead: Lead) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let stamp = "2026-01-01T00:00:00Z";
        lead.insert("id".into(), json!(id));
        lead.entry("createdAt").or_insert(json!(stamp));
        lead.insert("updatedAt".into(), json!(stamp));
        self.leads.insert(id, lead);
        id
    }

    /// `GET /rest/v1/lead/{id}.json`
    pub fn by_id(&self, id: u64, fields: Option<&str>) -> Value {
        let result: Vec<Value> = self
            .leads
            .get(&id)
            .map(|lead| project(lead, fields))
            .into_iter()
            .collect();
        Value::Array(result)
    }

    /// `GET /rest/v1/leads/describe.json`: the lead fields, as Marketo
    /// describes them.
    pub fn describe_fields(&self) -> Value {
        let fields: Vec<Value> = DEFAULT_FIELDS
            .iter()
            .enumerate()
            .map(|(index, name)| {
                let data_type = match *name {
                    "id" => "integer",
                    "updatedAt" | "createdAt" => "datetime",
                    "email" => "email",
                    _ => "string",
                };
                json!({
                    "id": index + 1,
                    "displayName": name,
                    "dataType": data_type,
                    "length": (data_type == "string" || data_type == "email").then_some(255),
                    "rest": {"name": name, "readOnly": matches!(*name, "id" | "updatedAt" | "createdAt")},
                    "soap": {"name": name, "readOnly": matches!(*name, "id" | "updatedAt" | "createdAt")},
                })
            })
            .collect();
        Value::Array(fields)
    }

    /// `GET /rest/v1/leads.json?filterType=..&filterValues=..`
    pub fn by_filter(&self, params: &BTreeMap<String, String>) -> LeadAnswer {
        let filter_type = params.get("filterType").ok_or((
            crate::marketo::code::INVALID_VALUE,
            "filterType not specified".to_owned(),
        ))?;
        let values: Vec<&str> = params
            .get("filterValues")
            .map(|values| values.split(',').map(str::trim).collect())
            .unwrap_or_default();
        if values.is_empty() || values.len() > 300 {
            return Err((
                crate::marketo::code::INVALID_VALUE,
                "filterValues must hold 1 to 300 values".to_owned(),
            ));
        }
        let fields = params.get("fields").map(String::as_str);
        let result = self
            .leads
            .values()
            .filter(|lead| {
                lead.get(filter_type.as_str())
                    .map(|value| match value {
                        Value::String(text) => values.iter().any(|wanted| text.eq_ignore_ascii_case(wanted)),
                        other => {
                            let text = other.to_string();
                            values.iter().any(|wanted| text == *wanted)
                        }
                    })
                    .unwrap_or(false)
            })
            .map(|lead| project(lead, fields))
            .collect();
        Ok(Value::Array(result))
    }

    /// `POST /rest/v1/leads.json` with a JSON body (createOrUpdate and friends).
    pub fn sync(&mut self, body: &Value) -> LeadAnswer {
        let action = body
            .get("action")
            .and_then(Value::as_str)
            .unwrap_or("createOrUpdate");
        let lookup = body
            .get("lookupField")
            .and_then(Value::as_str)
            .unwrap_or("email")
            .to_owned();
        let Some(input) = body.get("input").and_then(Value::as_array) else {
            return Err((
                crate::marketo::code::INVALID_VALUE,
                "input not specified".to_owned(),
            ));
        };
        if input.len() > 300 {
            return Err((
                crate::marketo::code::INVALID_VALUE,
                "at most 300 records per call".to_owned(),
            ));
        }
        let mut result = Vec::with_capacity(input.len());
        for record in input {
            let Some(record) = record.as_object() else {
                result.push(skipped("1003", "record is not an object"));
                continue;
            };
            let existing = record.get(&lookup).and_then(|key| {
                self.leads
                    .iter()
                    .find(|(_, lead)| lead.get(&lookup) == Some(key))
                    .map(|(id, _)| *id)
            });
            match (existing, action) {
                (Some(id), "createOrUpdate" | "updateOnly") => {
                    if let Some(lead) = self.leads.get_mut(&id) {
                        for (field, value) in record {
                            if field != "id" {
                                lead.insert(field.clone(), value.clone());
                            }
                        }
                    }
                    result.push(json!({"id": id, "status": "updated"}));
                }
                (None, "createOrUpdate" | "createOnly") => {
                    let id = self.insert(record.clone());
                    result.push(json!({"id": id, "status": "created"}));
                }
                (Some(_), "createOnly") => result.push(skipped("1005", "Lead already exists")),
                (None, "updateOnly") => result.push(skipped("1004", "Lead not found")),
                _ => {
                    return Err((
                        crate::marketo::code::INVALID_VALUE,
                        format!("Invalid action '{action}'"),
                    ));
                }
            }
        }
        Ok(Value::Array(result))
    }

    /// The CSV rows of an export of `fields`: a header, then one row per
    /// lead.
    pub fn rows(&self, fields: &[String]) -> Vec<String> {
        let mut rows = Vec::with_capacity(self.leads.len() + 1);
        rows.push(format!("{}\n", fields.join(",")));
        for lead in self.leads.values() {
            let cells: Vec<String> = fields
                .iter()
                .map(|field| match lead.get(field) {
                    Some(Value::String(text)) => csv_cell(text),
                    Some(Value::Null) | None => String::new(),
                    Some(other) => other.to_string(),
                })
                .collect();
            rows.push(format!("{}\n", cells.join(",")));
        }
        rows
    }
}

fn project(lead: &Lead, fields: Option<&str>) -> Value {
    match fields {
        None => Value::Object(
            DEFAULT_FIELDS
                .iter()
                .filter_map(|field| lead.get(*field).map(|value| ((*field).to_owned(), value.clone())))
                .collect(),
        ),
        Some(fields) => {
            let mut out = Lead::new();
            if let Some(id) = lead.get("id") {
                out.insert("id".into(), id.clone());
            }
            for field in fields.split(',').map(str::trim).filter(|field| !field.is_empty()) {
                out.insert(field.to_owned(), lead.get(field).cloned().unwrap_or(Value::Null));
            }
            Value::Object(out)
        }
    }
}

fn skipped(code: &str, message: &str) -> Value {
    json!({"status": "skipped", "reasons": [{"code": code, "message": message}]})
}

fn csv_cell(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

//! Which bulk call a request is, read by the simulator on its own: a table
//! of Marketo's documented bulk paths, so that a mistake in the proxy's
//! parser (`bulk::endpoint`) shows up as a call the simulator answers
//! differently, instead of being shared by both.

use http::Method;

use crate::bulk::endpoint::{Kind, Op};

/// A bulk call: its job kind and operation, the job it names, and the
/// base path its jobs are listed under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkCall {
    pub kind: Kind,
    pub op: Op,
    pub job: Option<String>,
    pub base: String,
}

/// Method, path pattern, the base its jobs are listed under, and what it
/// is. In a pattern, `{id}` is the job (`{id}.json` a batch file's),
/// `{name}` a custom object's name and `{program}` a program id.
const ROUTES: &[(&str, &str, &str, Kind, Op)] = &[
    (
        "POST",
        "/bulk/v1/leads/export/create.json",
        "/bulk/v1/leads",
        Kind::Leads,
        Op::Create,
    ),
    (
        "POST",
        "/bulk/v1/leads/export/{id}/enqueue.json",
        "/bulk/v1/leads",
        Kind::Leads,
        Op::Enqueue,
    ),
    (
        "POST",
        "/bulk/v1/leads/export/{id}/cancel.json",
        "/bulk/v1/leads",
        Kind::Leads,
        Op::Cancel,
    ),
    (
        "GET",
        "/bulk/v1/leads/export/{id}/status.json",
        "/bulk/v1/leads",
        Kind::Leads,
        Op::Status,
    ),
    (
        "GET",
        "/bulk/v1/leads/export/{id}/file.json",
        "/bulk/v1/leads",
        Kind::Leads,
        Op::File,
    ),
    (
        "GET",
        "/bulk/v1/leads/export.json",
        "/bulk/v1/leads",
        Kind::Leads,
        Op::List,
    ),
    (
        "POST",
        "/bulk/v1/activities/export/create.json",
        "/bulk/v1/activities",
        Kind::Activities,
        Op::Create,
    ),
    (
        "POST",
        "/bulk/v1/activities/export/{id}/enqueue.json",
        "/bulk/v1/activities",
        Kind::Activities,
        Op::Enqueue,
    ),
    (
        "POST",
        "/bulk/v1/activities/export/{id}/cancel.json",
        "/bulk/v1/activities",
        Kind::Activities,
        Op::Cancel,
    ),
    (
        "GET",
        "/bulk/v1/activities/export/{id}/status.json",
        "/bulk/v1/activities",
        Kind::Activities,
        Op::Status,
    ),
    (
        "GET",
        "/bulk/v1/activities/export/{id}/file.json",
        "/bulk/v1/activities",
        Kind::Activities,
        Op::File,
    ),
    (
        "GET",
        "/bulk/v1/activities/export.json",
        "/bulk/v1/activities",
        Kind::Activities,
        Op::List,
    ),
    (
        "POST",
        "/bulk/v1/program/members/export/create.json",
        "/bulk/v1/program/members",
        Kind::ProgramMembers,
        Op::Create,
    ),
    (
        "POST",
        "/bulk/v1/program/members/export/{id}/enqueue.json",
        "/bulk/v1/program/members",
        Kind::ProgramMembers,
        Op::Enqueue,
    ),
    (
        "POST",
        "/bulk/v1/program/members/export/{id}/cancel.json",
        "/bulk/v1/program/members",
        Kind::ProgramMembers,
        Op::Cancel,
    ),
    (
        "GET",
        "/bulk/v1/program/members/export/{id}/status.json",
        "/bulk/v1/program/members",
        Kind::ProgramMembers,
        Op::Status,
    ),
    (
        "GET",
        "/bulk/v1/program/members/export/{id}/file.json",
        "/bulk/v1/program/members",
        Kind::ProgramMembers,
        Op::File,
    ),
    (
        "GET",
        "/bulk/v1/program/members/export.json",
        "/bulk/v1/program/members",
        Kind::ProgramMembers,
        Op::List,
    ),
    (
        "POST",
        "/bulk/v1/customobjects/{name}/export/create.json",
        "/bulk/v1/customobjects/{name}",
        Kind::CustomObjects,
        Op::Create,
    ),
    (
        "POST",
        "/bulk/v1/customobjects/{name}/export/{id}/enqueue.json",
        "/bulk/v1/customobjects/{name}",
        Kind::CustomObjects,
        Op::Enqueue,
    ),
    (
        "POST",
        "/bulk/v1/customobjects/{name}/export/{id}/cancel.json",
        "/bulk/v1/customobjects/{name}",
        Kind::CustomObjects,
        Op::Cancel,
    ),
    (
        "GET",
        "/bulk/v1/customobjects/{name}/export/{id}/status.json",
        "/bulk/v1/customobjects/{name}",
        Kind::CustomObjects,
        Op::Status,
    ),
    (
        "GET",
        "/bulk/v1/customobjects/{name}/export/{id}/file.json",
        "/bulk/v1/customobjects/{name}",
        Kind::CustomObjects,
        Op::File,
    ),
    (
        "GET",
        "/bulk/v1/customobjects/{name}/export.json",
        "/bulk/v1/customobjects/{name}",
        Kind::CustomObjects,
        Op::List,
    ),
    (
        "POST",
        "/bulk/v1/leads.json",
        "/bulk/v1/leads",
        Kind::LeadImport,
        Op::Import,
    ),
    (
        "GET",
        "/bulk/v1/leads/batch/{id}.json",
        "/bulk/v1/leads",
        Kind::LeadImport,
        Op::Status,
    ),
    (
        "POST",
        "/bulk/v1/customobjects/{name}/import.json",
        "/bulk/v1/customobjects/{name}",
        Kind::CustomObjectImport,
        Op::Import,
    ),
    (
        "GET",
        "/bulk/v1/customobjects/{name}/import/{id}/status.json",
        "/bulk/v1/customobjects/{name}",
        Kind::CustomObjectImport,
        Op::Status,
    ),
    (
        "POST",
        "/bulk/v1/program/{program}/members/import.json",
        "/bulk/v1/program/members",
        Kind::ProgramMemberImport,
        Op::Import,
    ),
    (
        "GET",
        "/bulk/v1/program/members/import/{id}/status.json",
        "/bulk/v1/program/members",
        Kind::ProgramMemberImport,
        Op::Status,
    ),
];

/// The bulk call `method` `path` is, if the table has it.
pub fn route(method: &Method, path: &str) -> Option<BulkCall> {
    ROUTES.iter().find_map(|(route_method, pattern, base, kind, op)| {
        if method.as_str() != *route_method {
            return None;
        }
        let (job, name) = captures(pattern, path)?;
        Some(BulkCall {
            kind: *kind,
            op: *op,
            job,
            base: base.replace("{name}", name.unwrap_or_default()),
        })
    })
}

/// The job and the custom object's name when `path` fits `pattern`.
fn captures<'a>(pattern: &str, path: &'a str) -> Option<(Option<String>, Option<&'a str>)> {
    let wanted: Vec<&str> = pattern.split('/').collect();
    let given: Vec<&str> = path.split('/').collect();
    if wanted.len() != given.len() {
        return None;
    }
    let (mut job, mut name) = (None, None);
    for (want, got) in wanted.into_iter().zip(given) {
        match want {
            "{id}" if !got.is_empty() => job = Some(got.to_owned()),
            "{id}.json" => job = Some(got.strip_suffix(".json").filter(|id| !id.is_empty())?.to_owned()),
            "{name}" if !got.is_empty() => name = Some(got),
            "{program}" if !got.is_empty() => {}
            literal if literal == got => {}
            _ => return None,
        }
    }
    Some((job, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_reads_exports_imports_and_their_bases() {
        let call = route(
            &Method::POST,
            "/bulk/v1/customobjects/car_c/export/abc/enqueue.json",
        )
        .expect("a route");
        assert_eq!(
            call,
            BulkCall {
                kind: Kind::CustomObjects,
                op: Op::Enqueue,
                job: Some("abc".to_owned()),
                base: "/bulk/v1/customobjects/car_c".to_owned(),
            }
        );
        let batch = route(&Method::GET, "/bulk/v1/leads/batch/1042.json").expect("a route");
        assert_eq!(
            (batch.kind, batch.op, batch.job.as_deref()),
            (Kind::LeadImport, Op::Status, Some("1042"))
        );
        assert_eq!(batch.base, "/bulk/v1/leads");
        let import = route(&Method::POST, "/bulk/v1/program/1001/members/import.json").expect("a route");
        assert_eq!(
            (import.kind, import.base.as_str()),
            (Kind::ProgramMemberImport, "/bulk/v1/program/members")
        );
        assert_eq!(
            route(&Method::GET, "/bulk/v1/leads/export/create.json"),
            None,
            "wrong method"
        );
        assert_eq!(
            route(&Method::POST, "/bulk/v1/leads/export/x/y/enqueue.json"),
            None
        );
    }

    #[test]
    fn the_table_and_the_proxys_parser_agree_on_every_documented_path() {
        for (method, pattern, _, kind, op) in ROUTES {
            let path = pattern
                .replace("{name}", "car_c")
                .replace("{program}", "1001")
                .replace("{id}", "77");
            let method = Method::from_bytes(method.as_bytes()).expect("a method");
            let ours = route(&method, &path).expect("its own route");
            let theirs = crate::bulk::endpoint::Endpoint::parse(&method, &path).expect("the proxy reads it");
            assert_eq!((ours.kind, ours.op), (*kind, *op), "{path}");
            assert_eq!(
                (
                    theirs.kind,
                    theirs.op,
                    theirs.job.as_deref(),
                    theirs.base.as_str()
                ),
                (ours.kind, ours.op, ours.job.as_deref(), ours.base.as_str()),
                "{path}"
            );
        }
    }
}

//! Marketo's bulk endpoints, read from a method and a path: which queue a
//! call touches, which kind of job, what it does to it and which job it
//! names. The simulator routes with it and the proxy recognises the calls
//! it tracks with it, so both read the paths the same way.
//!
//! Extract jobs (leads, activities, program members, custom objects) share
//! one queue; imports have their own:
//!
//! | call | path |
//! |---|---|
//! | create an export | `POST /bulk/v1/{base}/export/create.json` |
//! | enqueue, cancel | `POST /bulk/v1/{base}/export/{exportId}/enqueue.json`, `.../cancel.json` |
//! | status, file | `GET /bulk/v1/{base}/export/{exportId}/status.json`, `.../file.json` |
//! | list exports | `GET /bulk/v1/{base}/export.json?status=Queued,Processing` |
//! | import leads | `POST /bulk/v1/leads.json`; status `GET /bulk/v1/leads/batch/{batchId}.json` |
//! | import custom objects | `POST /bulk/v1/customobjects/{name}/import.json`; status `.../import/{batchId}/status.json` |
//! | import program members | `POST /bulk/v1/program/{programId}/members/import.json`; status `GET /bulk/v1/program/members/import/{batchId}/status.json` |
//!
//! where `{base}` is `leads`, `activities`, `program/members` or
//! `customobjects/{name}`.

use http::Method;

/// Marketo's two bulk queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Queue {
    Extract,
    Import,
}

impl Queue {
    pub const ALL: [Self; 2] = [Self::Extract, Self::Import];

    pub fn label(self) -> &'static str {
        match self {
            Self::Extract => "extract",
            Self::Import => "import",
        }
    }

    /// Marketo's error when the queue is full: 1029 for extracts, 1016
    /// for imports.
    pub fn full_code(self) -> &'static str {
        match self {
            Self::Extract => crate::marketo::code::TOO_MANY_JOBS,
            Self::Import => TOO_MANY_IMPORTS,
        }
    }

    pub fn full_message(self) -> &'static str {
        match self {
            Self::Extract => TOO_MANY_JOBS_MESSAGE,
            Self::Import => "Too many imports",
        }
    }
}

/// Marketo's code for an import queue that is full.
pub const TOO_MANY_IMPORTS: &str = "1016";
/// Marketo's message with 1029 when the extract queue is full.
pub const TOO_MANY_JOBS_MESSAGE: &str = "Too many jobs in queue";
/// Marketo's message with 1029 when the day's export bytes are spent.
pub const EXPORT_QUOTA_MESSAGE: &str = "Export daily quota exceeded";

/// The kind of a bulk job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Leads,
    Activities,
    ProgramMembers,
    CustomObjects,
    LeadImport,
    CustomObjectImport,
    ProgramMemberImport,
}

impl Kind {
    pub const ALL: [Self; 7] = [
        Self::Leads,
        Self::Activities,
        Self::ProgramMembers,
        Self::CustomObjects,
        Self::LeadImport,
        Self::CustomObjectImport,
        Self::ProgramMemberImport,
    ];

    pub fn queue(self) -> Queue {
        match self {
            Self::Leads | Self::Activities | Self::ProgramMembers | Self::CustomObjects => Queue::Extract,
            Self::LeadImport | Self::CustomObjectImport | Self::ProgramMemberImport => Queue::Import,
        }
    }

    /// The `kind` label of `marketo_proxy_bulk_jobs`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Leads => "leads",
            Self::Activities => "activities",
            Self::ProgramMembers => "program_members",
            Self::CustomObjects => "custom_objects",
            Self::LeadImport => "leads_import",
            Self::CustomObjectImport => "custom_objects_import",
            Self::ProgramMemberImport => "program_members_import",
        }
    }

    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.label() == label)
    }
}

/// What a bulk call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Creates an export job (state `Created`).
    Create,
    /// Puts an export job in the queue.
    Enqueue,
    /// Reads a job's status.
    Status,
    Cancel,
    /// Downloads an export's file.
    File,
    /// Lists export jobs.
    List,
    /// Creates an import job, queued at once.
    Import,
}

/// One bulk call, read from its method and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub kind: Kind,
    pub op: Op,
    /// The job the path names, if it names one.
    pub job: Option<String>,
    /// `/bulk/v1/{base}` of an export, or of a custom object's imports.
    pub base: String,
}

/// The job states Marketo reports, on both queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobState {
    Created,
    Queued,
    Processing,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [Self; 6] = [
        Self::Created,
        Self::Queued,
        Self::Processing,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
    ];

    /// In the queue: counts against its limit.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Queued | Self::Processing)
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// The `state` label of `marketo_proxy_bulk_jobs`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Queued => "queued",
            Self::Processing => "processing",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.label() == label)
    }

    /// Marketo's word for the state on `queue` (imports say `Importing`
    /// and `Complete`).
    pub fn marketo_name(self, queue: Queue) -> &'static str {
        match (self, queue) {
            (Self::Created, _) => "Created",
            (Self::Queued, _) => "Queued",
            (Self::Processing, Queue::Extract) => "Processing",
            (Self::Processing, Queue::Import) => "Importing",
            (Self::Completed, Queue::Extract) => "Completed",
            (Self::Completed, Queue::Import) => "Complete",
            (Self::Failed, _) => "Failed",
            (Self::Cancelled, _) => "Cancelled",
        }
    }

    /// Reads the state from Marketo's word for it, on either queue.
    pub fn from_marketo(name: &str) -> Option<Self> {
        match name {
            "Created" => Some(Self::Created),
            "Queued" => Some(Self::Queued),
            "Processing" | "Importing" => Some(Self::Processing),
            "Completed" | "Complete" => Some(Self::Completed),
            "Failed" => Some(Self::Failed),
            "Cancelled" => Some(Self::Cancelled),
            _ => None,
        }
    }
}

impl Endpoint {
    /// The bulk call `method` `path` makes, if it is one this module knows.
    /// Cheap to reject: anything outside `/bulk/v1/` is refused on its
    /// prefix.
    pub fn parse(method: &Method, path: &str) -> Option<Self> {
        let rest = path.strip_prefix("/bulk/v1/")?;
        let segments: Vec<&str> = rest.split('/').collect();
        let post = method == Method::POST;
        let get = method == Method::GET;
        let (kind, base_len) = match segments.as_slice() {
            ["leads", ..] if segments.get(1) != Some(&"batch") => (Kind::Leads, 1),
            ["activities", ..] => (Kind::Activities, 1),
            ["program", "members", "export", ..] | ["program", "members", "export.json"] => {
                (Kind::ProgramMembers, 2)
            }
            ["customobjects", _, "export", ..] | ["customobjects", _, "export.json"] => {
                (Kind::CustomObjects, 2)
            }
            _ => return Self::parse_import(post, get, &segments),
        };
        let base = format!("/bulk/v1/{}", segments[..base_len].join("/"));
        let (op, job) = match (&segments[base_len..], post, get) {
            (["export", "create.json"], true, _) => (Op::Create, None),
            (["export", id, "enqueue.json"], true, _) => (Op::Enqueue, Some(*id)),
            (["export", id, "cancel.json"], true, _) => (Op::Cancel, Some(*id)),
            (["export", id, "status.json"], _, true) => (Op::Status, Some(*id)),
            (["export", id, "file.json"], _, true) => (Op::File, Some(*id)),
            (["export.json"], _, true) => (Op::List, None),
            _ => return None,
        };
        Some(Self {
            kind,
            op,
            job: job.map(str::to_owned),
            base,
        })
    }

    fn parse_import(post: bool, get: bool, segments: &[&str]) -> Option<Self> {
        let (kind, op, job, base) = match (segments, post, get) {
            (["leads.json"], true, _) => (Kind::LeadImport, Op::Import, None, "/bulk/v1/leads".to_owned()),
            (["leads", "batch", file], _, true) => (
                Kind::LeadImport,
                Op::Status,
                Some(file.strip_suffix(".json")?),
                "/bulk/v1/leads".to_owned(),
            ),
            (["customobjects", name, "import.json"], true, _) => (
                Kind::CustomObjectImport,
                Op::Import,
                None,
                format!("/bulk/v1/customobjects/{name}"),
            ),
            (["customobjects", name, "import", id, "status.json"], _, true) => (
                Kind::CustomObjectImport,
                Op::Status,
                Some(*id),
                format!("/bulk/v1/customobjects/{name}"),
            ),
            (["program", _, "members", "import.json"], true, _) => (
                Kind::ProgramMemberImport,
                Op::Import,
                None,
                "/bulk/v1/program/members".to_owned(),
            ),
            (["program", "members", "import", id, "status.json"], _, true) => (
                Kind::ProgramMemberImport,
                Op::Status,
                Some(*id),
                "/bulk/v1/program/members".to_owned(),
            ),
            _ => return None,
        };
        Some(Self {
            kind,
            op,
            job: job.map(str::to_owned),
            base,
        })
    }
}

/// Where a job's status is read: what the proxy calls to poll a job.
pub fn status_path(kind: Kind, base: &str, job: &str) -> String {
    match kind {
        Kind::LeadImport => format!("/bulk/v1/leads/batch/{job}.json"),
        Kind::CustomObjectImport | Kind::ProgramMemberImport => format!("{base}/import/{job}/status.json"),
        _ => format!("{base}/export/{job}/status.json"),
    }
}

/// Where the export jobs of a kind are listed (custom objects need the
/// object's name, so they are not listed).
pub fn list_path(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::Leads => Some("/bulk/v1/leads/export.json"),
        Kind::Activities => Some("/bulk/v1/activities/export.json"),
        Kind::ProgramMembers => Some("/bulk/v1/program/members/export.json"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(method: Method, path: &str) -> Option<(Kind, Op, Option<String>, String)> {
        Endpoint::parse(&method, path)
            .map(|endpoint| (endpoint.kind, endpoint.op, endpoint.job, endpoint.base))
    }

    #[test]
    fn reads_every_bulk_call_it_tracks() {
        let some = |kind, op, job: Option<&str>, base: &str| {
            Some((kind, op, job.map(str::to_owned), base.to_owned()))
        };
        let cases = [
            (
                Method::POST,
                "/bulk/v1/leads/export/create.json",
                some(Kind::Leads, Op::Create, None, "/bulk/v1/leads"),
            ),
            (
                Method::POST,
                "/bulk/v1/leads/export/ab-1/enqueue.json",
                some(Kind::Leads, Op::Enqueue, Some("ab-1"), "/bulk/v1/leads"),
            ),
            (
                Method::GET,
                "/bulk/v1/activities/export/x/status.json",
                some(Kind::Activities, Op::Status, Some("x"), "/bulk/v1/activities"),
            ),
            (
                Method::POST,
                "/bulk/v1/program/members/export/x/cancel.json",
                some(
                    Kind::ProgramMembers,
                    Op::Cancel,
                    Some("x"),
                    "/bulk/v1/program/members",
                ),
            ),
            (
                Method::GET,
                "/bulk/v1/customobjects/car_c/export/x/file.json",
                some(
                    Kind::CustomObjects,
                    Op::File,
                    Some("x"),
                    "/bulk/v1/customobjects/car_c",
                ),
            ),
            (
                Method::GET,
                "/bulk/v1/leads/export.json",
                some(Kind::Leads, Op::List, None, "/bulk/v1/leads"),
            ),
            (
                Method::POST,
                "/bulk/v1/leads.json",
                some(Kind::LeadImport, Op::Import, None, "/bulk/v1/leads"),
            ),
            (
                Method::GET,
                "/bulk/v1/leads/batch/3404.json",
                some(Kind::LeadImport, Op::Status, Some("3404"), "/bulk/v1/leads"),
            ),
            (
                Method::POST,
                "/bulk/v1/customobjects/car_c/import.json",
                some(
                    Kind::CustomObjectImport,
                    Op::Import,
                    None,
                    "/bulk/v1/customobjects/car_c",
                ),
            ),
            (
                Method::GET,
                "/bulk/v1/customobjects/car_c/import/7/status.json",
                some(
                    Kind::CustomObjectImport,
                    Op::Status,
                    Some("7"),
                    "/bulk/v1/customobjects/car_c",
                ),
            ),
            (
                Method::POST,
                "/bulk/v1/program/1044/members/import.json",
                some(
                    Kind::ProgramMemberImport,
                    Op::Import,
                    None,
                    "/bulk/v1/program/members",
                ),
            ),
            (
                Method::GET,
                "/bulk/v1/program/members/import/9/status.json",
                some(
                    Kind::ProgramMemberImport,
                    Op::Status,
                    Some("9"),
                    "/bulk/v1/program/members",
                ),
            ),
            (Method::GET, "/bulk/v1/leads/export/create.json", None),
            (Method::GET, "/rest/v1/leads.json", None),
            (Method::GET, "/bulk/v1/leads/batch/1/failures.json", None),
            (Method::POST, "/bulk/v1/elsewhere/export/create.json", None),
        ];
        for (method, path, expected) in cases {
            assert_eq!(parse(method.clone(), path), expected, "{method} {path}");
        }
    }

    #[test]
    fn status_paths_round_trip_through_the_parser() {
        for (kind, base) in [
            (Kind::Leads, "/bulk/v1/leads"),
            (Kind::CustomObjects, "/bulk/v1/customobjects/car_c"),
            (Kind::LeadImport, "/bulk/v1/leads"),
            (Kind::CustomObjectImport, "/bulk/v1/customobjects/car_c"),
            (Kind::ProgramMemberImport, "/bulk/v1/program/members"),
        ] {
            let path = status_path(kind, base, "42");
            let endpoint = Endpoint::parse(&Method::GET, &path).unwrap();
            assert_eq!(
                (endpoint.kind, endpoint.op, endpoint.job.as_deref()),
                (kind, Op::Status, Some("42")),
                "{path}"
            );
        }
    }

    #[test]
    fn states_read_both_queues_words() {
        for state in JobState::ALL {
            for queue in Queue::ALL {
                assert_eq!(JobState::from_marketo(state.marketo_name(queue)), Some(state));
            }
        }
    }
}

#![allow(clippy::unwrap_used, clippy::expect_used)]
//! End-to-end tests of the simulated Marketo instance over real sockets.
//!
//! Every other end-to-end test trusts the simulator to behave like Marketo
//! (identity, the rolling window, the concurrency limit, the daily quota,
//! envelopes, faults), so these tests pin that behaviour down. Each test
//! starts its own simulator on an ephemeral port with short windows and
//! TTLs, and talks to it with `reqwest`.

mod support;

use std::time::{Duration, Instant};

use marketo_proxy::sim::{FailNext, Failure, Faults, SimClient, SimConfig, SimHandle, Simulator, Stats};
use reqwest::StatusCode;
use serde_json::{Value, json};

const TOKEN_PATH: &str = "/identity/oauth/token";
const LEAD_ONE: &str = "/rest/v1/lead/1.json";

/// Marketo's limits, but no latency and a small lead database.
fn quick_config() -> SimConfig {
    SimConfig {
        latency: Duration::ZERO,
        export_time: Duration::from_millis(200),
        leads: 10,
        ..SimConfig::default()
    }
}

fn other_client() -> SimClient {
    "other-client:other-secret:other@example.com".parse().unwrap()
}

/// A running simulator and an HTTP client pointed at it.
struct Harness {
    sim: SimHandle,
    http: reqwest::Client,
}

impl Harness {
    async fn start(config: SimConfig) -> Self {
        let sim = Simulator::spawn(config)
            .await
            .expect("simulator binds 127.0.0.1:0");
        Self {
            sim,
            http: http_client(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.sim.url())
    }

    /// Asks for a token with query parameters and returns the whole answer.
    async fn token_answer(&self, client: &SimClient) -> (StatusCode, Value) {
        let response = self
            .http
            .get(self.url(TOKEN_PATH))
            .query(&[
                ("grant_type", "client_credentials"),
                ("client_id", client.client_id.as_str()),
                ("client_secret", client.client_secret.as_str()),
            ])
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    async fn token_for(&self, client: &SimClient) -> String {
        let (status, answer) = self.token_answer(client).await;
        assert_eq!(status, StatusCode::OK, "identity answered {answer}");
        answer["access_token"].as_str().unwrap().to_owned()
    }

    async fn token(&self) -> String {
        self.token_for(&SimClient::demo()).await
    }

    /// A GET with a bearer token; asserts Marketo's HTTP 200 and returns
    /// the JSON body.
    /// Sends `count` GETs of `path` at once; their codes, sorted.
    async fn codes_at_once(&self, count: usize, path: &str, token: &str) -> Vec<String> {
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..count {
            let request = self.http.get(self.url(path)).bearer_auth(token);
            calls.spawn(async move {
                let response = request.send().await.unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                let body: Value = response.json().await.unwrap();
                code(&body).to_owned()
            });
        }
        let mut codes = calls.join_all().await;
        codes.sort();
        codes
    }

    async fn get(&self, path: &str, token: &str) -> Value {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }

    /// Posts faults as JSON to `/_sim/faults`.
    async fn post_faults(&self, faults: Value) -> StatusCode {
        self.http
            .post(self.url("/_sim/faults"))
            .json(&faults)
            .send()
            .await
            .unwrap()
            .status()
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// `"ok"` for a `success:true` answer, else the first error code.
fn code(body: &Value) -> &str {
    if body["success"] == json!(true) {
        return "ok";
    }
    assert_eq!(body["success"], json!(false), "not a Marketo envelope: {body}");
    assert!(body["requestId"].is_string(), "no requestId in {body}");
    assert!(body["errors"][0]["message"].is_string(), "no message in {body}");
    body["errors"][0]["code"].as_str().expect("code is a string")
}

fn fail_next(count: u32, failure: Failure) -> Faults {
    Faults {
        fail_next: Some(FailNext { count, failure }),
        ..Faults::default()
    }
}

// ---------------------------------------------------------------- identity

#[tokio::test]
async fn identity_get_with_query_returns_marketo_token_shape() {
    let harness = Harness::start(quick_config()).await;

    let (status, answer) = harness.token_answer(&SimClient::demo()).await;

    assert_eq!(status, StatusCode::OK);
    let token = answer["access_token"].as_str().unwrap();
    assert!(!token.is_empty());
    assert_eq!(answer["token_type"], "bearer");
    assert_eq!(answer["expires_in"], 3599);
    assert_eq!(answer["scope"], "demo@example.com");
    assert_eq!(harness.sim.stats().identity_calls, 1);
}

#[tokio::test]
async fn identity_post_with_form_body_returns_the_same_token_as_get() {
    let harness = Harness::start(quick_config()).await;
    let from_get = harness.token().await;

    let response = harness
        .http
        .post(harness.url(TOKEN_PATH))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "demo-client"),
            ("client_secret", "demo-secret"),
        ])
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["access_token"], from_get.as_str());
    assert_eq!(answer["token_type"], "bearer");
    assert_eq!(answer["scope"], "demo@example.com");
}

#[tokio::test]
async fn identity_rejects_bad_credentials_with_http_401_invalid_client() {
    let harness = Harness::start(quick_config()).await;
    let wrong_secret = SimClient {
        client_secret: "wrong".into(),
        ..SimClient::demo()
    };
    let unknown_id = SimClient {
        client_id: "nobody".into(),
        ..SimClient::demo()
    };

    for client in [wrong_secret, unknown_id] {
        let (status, answer) = harness.token_answer(&client).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            answer,
            json!({"error": "invalid_client", "error_description": "Bad client credentials"})
        );
    }
}

#[tokio::test]
async fn identity_rejects_other_grant_types_with_http_400() {
    let harness = Harness::start(quick_config()).await;

    let response = harness
        .http
        .get(harness.url(TOKEN_PATH))
        .query(&[
            ("grant_type", "password"),
            ("client_id", "demo-client"),
            ("client_secret", "demo-secret"),
        ])
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["error"], "unsupported_grant_type");
}

#[tokio::test]
async fn identity_returns_same_token_with_shrinking_expires_in_then_a_new_one_after_expiry() {
    let harness = Harness::start(SimConfig {
        token_ttl: Duration::from_secs(2),
        ..quick_config()
    })
    .await;

    let (_, first) = harness.token_answer(&SimClient::demo()).await;
    assert_eq!(first["expires_in"], 1);

    // The token's life passing is what is tested: into its last second,
    // then past its end.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, second) = harness.token_answer(&SimClient::demo()).await;
    assert_eq!(second["access_token"], first["access_token"]);
    assert!(
        second["expires_in"].as_u64().unwrap() < first["expires_in"].as_u64().unwrap(),
        "expires_in did not shrink: {first} then {second}"
    );
    assert_eq!(
        second["expires_in"], 0,
        "Marketo can answer 0 for a token about to expire"
    );

    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (_, third) = harness.token_answer(&SimClient::demo()).await;
    assert_ne!(third["access_token"], first["access_token"]);
    assert_eq!(third["expires_in"], 1);
}

#[tokio::test]
async fn each_api_user_gets_its_own_token_and_scope() {
    let harness = Harness::start(SimConfig {
        clients: vec![SimClient::demo(), other_client()],
        ..quick_config()
    })
    .await;

    let (_, demo) = harness.token_answer(&SimClient::demo()).await;
    let (_, other) = harness.token_answer(&other_client()).await;

    assert_ne!(demo["access_token"], other["access_token"]);
    assert_eq!(demo["scope"], "demo@example.com");
    assert_eq!(other["scope"], "other@example.com");
}

// ------------------------------------------------------------ token errors

#[tokio::test]
async fn missing_token_gets_600_and_unknown_token_gets_601_in_http_200_without_spending_quota() {
    let harness = Harness::start(quick_config()).await;

    let response = harness.http.get(harness.url(LEAD_ONE)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let missing: Value = response.json().await.unwrap();
    assert_eq!(code(&missing), "600");

    let unknown = harness.get(LEAD_ONE, "not-a-token:sim").await;
    assert_eq!(code(&unknown), "601");

    let token = harness.token().await;
    let usage = harness.get("/rest/v1/stats/usage.json", &token).await;
    assert_eq!(
        usage["result"][0]["total"], 1,
        "only the usage call itself counts: {usage}"
    );
    let stats = harness.sim.stats();
    assert_eq!(
        (stats.code("600"), stats.code("601"), stats.max_in_window),
        (1, 1, 1)
    );
}

#[tokio::test]
async fn expired_token_gets_602_in_http_200() {
    let harness = Harness::start(SimConfig {
        token_ttl: Duration::from_secs(1),
        ..quick_config()
    })
    .await;
    let token = harness.token().await;
    assert_eq!(code(&harness.get(LEAD_ONE, &token).await), "ok");

    // Past the token's 1 s life.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let expired = harness.get(LEAD_ONE, &token).await;

    assert_eq!(code(&expired), "602");
    assert_eq!(expired["errors"][0]["message"], "Access token expired");
    assert_eq!(harness.sim.stats().code("602"), 1);
}

// ------------------------------------------------------------------ limits

#[tokio::test]
async fn call_beyond_window_limit_gets_606_until_the_window_passes() {
    let window = Duration::from_secs(2);
    let harness = Harness::start(SimConfig {
        window_calls: 100,
        window,
        ..quick_config()
    })
    .await;
    let token = harness.token().await;

    let start = Instant::now();
    for call in 0..100 {
        let body = harness.get(LEAD_ONE, &token).await;
        assert_eq!(code(&body), "ok", "call {call} was refused: {body}");
    }
    let refused = harness.get(LEAD_ONE, &token).await;
    assert!(
        start.elapsed() < window,
        "101 calls took {:?}, longer than the window",
        start.elapsed()
    );
    assert_eq!(code(&refused), "606");
    assert_eq!(
        refused["errors"][0]["message"],
        "Max rate limit '100' exceeded with in '2' secs"
    );

    // Every call counted so far arrived before now: after one window they
    // have all left it.
    tokio::time::sleep(window + Duration::from_millis(50)).await;
    for _ in 0..3 {
        assert_eq!(code(&harness.get(LEAD_ONE, &token).await), "ok");
    }

    let stats = harness.sim.stats();
    assert_eq!(stats.max_admitted_in_window, 100);
    assert_eq!(stats.max_in_window, 101, "the refused call arrived too");
    assert_eq!(stats.code("606"), 1);
    assert_eq!(stats.ok, 103);
}

#[tokio::test]
async fn errors_report_counts_the_days_refusals_by_code_and_usage_only_executed_calls() {
    let window = Duration::from_secs(1);
    let harness = Harness::start(SimConfig {
        window_calls: 3,
        window,
        ..quick_config()
    })
    .await;
    let token = harness.token().await;
    let none = harness.get("/rest/v1/stats/errors.json", &token).await;
    assert_eq!(none["result"][0]["total"], 0, "{none}");
    assert_eq!(none["result"][0]["errors"], json!([]), "{none}");

    // The errors call above took one of the 3 slots: two more execute,
    // two are refused.
    let codes: Vec<String> = futures_util::future::join_all((0..4).map(|_| harness.get(LEAD_ONE, &token)))
        .await
        .iter()
        .map(|body| code(body).to_owned())
        .collect();
    assert_eq!(codes.iter().filter(|code| *code == "606").count(), 2, "{codes:?}");
    tokio::time::sleep(window + Duration::from_millis(50)).await;
    let errors = harness.get("/rest/v1/stats/errors.json", &token).await;
    let usage = harness.get("/rest/v1/stats/usage.json", &token).await;

    let today = &errors["result"][0];
    assert_eq!(today["date"], usage["result"][0]["date"]);
    assert_eq!(today["total"], 2, "{errors}");
    assert_eq!(today["errors"], json!([{"errorCode": "606", "count": 2}]));
    assert_eq!(
        usage["result"][0]["total"], 5,
        "two error reports, two lead calls and the usage call: {usage}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eleventh_concurrent_call_gets_615_while_ten_succeed() {
    let harness = Harness::start(SimConfig {
        concurrency: 10,
        latency: Duration::from_millis(400),
        ..quick_config()
    })
    .await;
    let token = harness.token().await;

    let codes = harness.codes_at_once(11, LEAD_ONE, &token).await;

    let mut expected = vec!["615".to_owned()];
    expected.extend(std::iter::repeat_n("ok".to_owned(), 10));
    expected.sort();
    assert_eq!(codes, expected);
    let stats = harness.sim.stats();
    assert_eq!(stats.max_admitted_in_flight, 10);
    assert_eq!(stats.max_in_flight, 11, "the refused call was in flight too");
    assert_eq!(stats.code("615"), 1);
    assert!(
        stats.arrivals.windows(2).all(|pair| pair[0].at <= pair[1].at),
        "arrivals are listed in arrival order, not completion order: {:?}",
        stats
            .arrivals
            .iter()
            .map(|arrival| (arrival.at, arrival.code.as_str()))
            .collect::<Vec<_>>()
    );
    // The slots come back when the calls end.
    assert_eq!(code(&harness.get(LEAD_ONE, &token).await), "ok");
}

/// What a proxy that overshoots looks like: the refused calls count in
/// `max_in_flight` and `max_in_window`, so those go above the limits while
/// the admitted figures stay at them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_overshoots_shows_above_the_limits_in_stats() {
    let harness = Harness::start(SimConfig {
        window_calls: 5,
        concurrency: 2,
        latency: Duration::from_millis(500),
        ..quick_config()
    })
    .await;
    let token = harness.token().await;

    // Four at once against a concurrency of 2: two run, two get 615 while
    // the first two are still running.
    let codes = harness.codes_at_once(4, LEAD_ONE, &token).await;
    assert_eq!(codes, ["615", "615", "ok", "ok"]);

    // Five more, one at a time, against a window of 5 that holds two.
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(code(&harness.get(LEAD_ONE, &token).await).to_owned());
    }
    assert_eq!(codes, ["ok", "ok", "ok", "606", "606"]);

    let stats = harness.sim.stats();
    assert_eq!(
        (stats.max_admitted_in_flight, stats.max_in_flight),
        (2, 3),
        "each 615 arrived while two calls were running"
    );
    assert_eq!(
        (stats.max_admitted_in_window, stats.max_in_window),
        (5, 9),
        "nine calls arrived in one window, five were admitted"
    );
}

#[tokio::test]
async fn call_abandoned_by_its_client_is_recorded_as_cancelled_and_frees_its_slot() {
    let harness = Harness::start(SimConfig {
        concurrency: 1,
        latency: Duration::from_millis(600),
        ..quick_config()
    })
    .await;
    let token = harness.token().await;

    let abandoned = harness
        .http
        .get(harness.url(LEAD_ONE))
        .bearer_auth(&token)
        .timeout(Duration::from_millis(100))
        .send()
        .await;
    assert!(abandoned.expect_err("the client gave up first").is_timeout());

    // The server notices the closed connection and drops the call.
    let stats = support::eventually(Duration::from_secs(5), async || {
        let stats = harness.sim.stats();
        if stats.calls > 0 { Ok(stats) } else { Err(stats) }
    })
    .await;
    assert_eq!(
        (stats.calls, stats.code("cancelled"), stats.max_in_window),
        (1, 1, 1)
    );
    assert_eq!(stats.arrivals[0].code, "cancelled");
    assert_eq!(
        code(&harness.get(LEAD_ONE, &token).await),
        "ok",
        "the concurrency slot was released"
    );
}

#[tokio::test]
async fn sixth_call_of_the_day_gets_607_with_a_daily_quota_of_5() {
    let harness = Harness::start(SimConfig {
        daily_quota: 5,
        ..quick_config()
    })
    .await;
    let token = harness.token().await;

    for call in 0..5 {
        assert_eq!(code(&harness.get(LEAD_ONE, &token).await), "ok", "call {call}");
    }
    let refused = harness.get(LEAD_ONE, &token).await;

    assert_eq!(code(&refused), "607");
    let stats = harness.sim.stats();
    assert_eq!((stats.ok, stats.code("607")), (5, 1));
}

#[tokio::test]
async fn identity_calls_do_not_count_against_window_or_quota() {
    let harness = Harness::start(SimConfig {
        window_calls: 2,
        daily_quota: 2,
        ..quick_config()
    })
    .await;

    for _ in 0..5 {
        harness.token().await;
    }
    let token = harness.token().await;

    assert_eq!(code(&harness.get(LEAD_ONE, &token).await), "ok");
    assert_eq!(code(&harness.get(LEAD_ONE, &token).await), "ok");
    assert_eq!(harness.sim.stats().identity_calls, 6);
}

#[tokio::test]
async fn uri_over_8_kb_gets_http_414_and_body_over_1_mb_gets_http_413() {
    let harness = Harness::start(quick_config()).await;
    let token = harness.token().await;

    let long = format!(
        "/rest/v1/leads.json?filterType=email&filterValues={}",
        "a".repeat(8 * 1024)
    );
    let response = harness
        .http
        .get(harness.url(&long))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::URI_TOO_LONG);

    let response = harness
        .http
        .post(harness.url("/rest/v1/leads.json"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(vec![b' '; 1024 * 1024 + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let stats = harness.sim.stats();
    assert_eq!(
        (
            stats.code("http_414"),
            stats.code("http_413"),
            stats.max_in_window
        ),
        (1, 1, 0)
    );
}

// ------------------------------------------------------------------- leads

#[tokio::test]
async fn lead_by_id_returns_the_seeded_lead() {
    let harness = Harness::start(quick_config()).await;
    let token = harness.token().await;

    let body = harness.get(LEAD_ONE, &token).await;

    assert_eq!(code(&body), "ok");
    let lead = &body["result"][0];
    assert_eq!(lead["id"], 1);
    assert_eq!(lead["email"], "lead1@example.com");
    assert_eq!(lead["firstName"], "First1");
    assert_eq!(lead["lastName"], "Last1");
    assert_eq!(body["result"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn leads_filtered_by_email_returns_the_matching_lead() {
    let harness = Harness::start(quick_config()).await;
    let token = harness.token().await;

    let body = harness
        .get(
            "/rest/v1/leads.json?filterType=email&filterValues=lead2@example.com",
            &token,
        )
        .await;

    assert_eq!(code(&body), "ok");
    let result = body["result"].as_array().unwrap();
    assert_eq!(result.len(), 1);
    assert_eq!(result[0]["id"], 2);
    assert_eq!(result[0]["email"], "lead2@example.com");
}

#[tokio::test]
async fn post_with_method_get_and_form_body_answers_like_the_get() {
    let harness = Harness::start(quick_config()).await;
    let token = harness.token().await;
    let by_get = harness
        .get(
            "/rest/v1/leads.json?filterType=email&filterValues=lead2@example.com,lead3@example.com&fields=email,firstName",
            &token,
        )
        .await;

    let response = harness
        .http
        .post(harness.url("/rest/v1/leads.json?_method=GET"))
        .bearer_auth(&token)
        .form(&[
            ("filterType", "email"),
            ("filterValues", "lead2@example.com,lead3@example.com"),
            ("fields", "email,firstName"),
        ])
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    let by_post: Value = response.json().await.unwrap();
    assert_eq!(code(&by_post), "ok");
    assert_eq!(by_post["result"], by_get["result"]);
    assert_eq!(by_post["result"].as_array().unwrap().len(), 2);
    assert_eq!(
        by_post["result"][1],
        json!({"id": 3, "email": "lead3@example.com", "firstName": "First3"})
    );
}

#[tokio::test]
async fn create_or_update_creates_a_lead_then_updates_it() {
    let harness = Harness::start(quick_config()).await;
    let token = harness.token().await;
    let sync = |first_name: &str| {
        harness
            .http
            .post(harness.url("/rest/v1/leads.json"))
            .bearer_auth(&token)
            .json(&json!({
                "action": "createOrUpdate",
                "lookupField": "email",
                "input": [{"email": "new@example.com", "firstName": first_name}],
            }))
            .send()
    };

    let created: Value = sync("New").await.unwrap().json().await.unwrap();
    assert_eq!(code(&created), "ok");
    assert_eq!(created["result"], json!([{"id": 11, "status": "created"}]));

    let updated: Value = sync("Renamed").await.unwrap().json().await.unwrap();
    assert_eq!(updated["result"], json!([{"id": 11, "status": "updated"}]));

    let lead = harness.get("/rest/v1/lead/11.json", &token).await;
    assert_eq!(lead["result"][0]["email"], "new@example.com");
    assert_eq!(lead["result"][0]["firstName"], "Renamed");
}

#[tokio::test]
async fn unknown_rest_path_gets_610_and_unknown_other_path_gets_http_404() {
    let harness = Harness::start(quick_config()).await;
    let token = harness.token().await;

    assert_eq!(
        code(&harness.get("/rest/v1/nothing-here.json", &token).await),
        "610"
    );
    let response = harness.http.get(harness.url("/elsewhere")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

// -------------------------------------------------------------------- bulk

#[tokio::test]
async fn bulk_export_goes_from_queued_to_completed_and_serves_one_csv_line_per_lead() {
    let harness = Harness::start(SimConfig {
        leads: 600,
        export_time: Duration::from_millis(200),
        ..quick_config()
    })
    .await;
    let token = harness.token().await;
    let post = |path: String, body: Value| {
        harness
            .http
            .post(harness.url(&path))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };

    let created: Value = post(
        "/bulk/v1/leads/export/create.json".into(),
        json!({"fields": ["id", "email"], "format": "CSV"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(code(&created), "ok");
    assert_eq!(created["result"][0]["status"], "Created");
    let id = created["result"][0]["exportId"].as_str().unwrap().to_owned();
    let job = format!("/bulk/v1/leads/export/{id}");

    let enqueued: Value = post(format!("{job}/enqueue.json"), json!({}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(enqueued["result"][0]["status"], "Queued");
    let status = harness.get(&format!("{job}/status.json"), &token).await;
    assert_eq!(status["result"][0]["status"], "Processing", "the queue was empty");
    let early = harness.get(&format!("{job}/file.json"), &token).await;
    assert_eq!(code(&early), "1003", "no file before the job completes");

    let status = support::eventually(Duration::from_secs(5), async || {
        let status = harness.get(&format!("{job}/status.json"), &token).await;
        match status["result"][0]["status"].as_str() {
            Some("Completed") => Ok(status),
            _ => Err(status),
        }
    })
    .await;
    assert_eq!(status["result"][0]["numberOfRecords"], 600);
    let file_size = status["result"][0]["fileSize"].as_u64().unwrap();

    let file = harness
        .http
        .get(harness.url(&format!("{job}/file.json")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(file.status(), StatusCode::OK);
    assert!(
        file.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    assert_eq!(
        file.content_length(),
        None,
        "the file is streamed, not sized up front"
    );
    let text = file.text().await.unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 601);
    assert_eq!(lines[0], "id,email");
    assert_eq!(lines[1], "1,lead1@example.com");
    assert_eq!(lines[600], "600,lead600@example.com");
    assert_eq!(text.len() as u64, file_size, "fileSize is the file's length");
    assert_eq!(harness.sim.stats().bulk.export_bytes_today, file_size);
}

impl Harness {
    /// A bulk POST with a bearer token; asserts HTTP 200 and returns the
    /// JSON body.
    async fn post(&self, path: &str, token: &str, body: Value) -> Value {
        let response = self
            .http
            .post(self.url(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }

    /// Creates an export of `base` (`leads`, `activities`, ...) and
    /// returns its id.
    async fn create_export(&self, base: &str, token: &str) -> String {
        let created = self
            .post(
                &format!("/bulk/v1/{base}/export/create.json"),
                token,
                json!({"format": "CSV"}),
            )
            .await;
        assert_eq!(code(&created), "ok", "{created}");
        created["result"][0]["exportId"].as_str().unwrap().to_owned()
    }
}

#[tokio::test]
async fn the_extract_queue_runs_two_holds_ten_and_refuses_the_eleventh_with_1029() {
    let harness = Harness::start(SimConfig {
        export_time: Duration::from_millis(300),
        // Status is polled often here; the window is not under test.
        window_calls: 100_000,
        ..quick_config()
    })
    .await;
    let token = harness.token().await;
    // Leads, activities, program members and custom objects share the queue.
    let bases = ["leads", "activities", "program/members", "customobjects/car_c"];
    let mut jobs = Vec::new();
    for index in 0..11 {
        let base = bases[index % bases.len()];
        let id = harness.create_export(base, &token).await;
        let enqueued = harness
            .post(
                &format!("/bulk/v1/{base}/export/{id}/enqueue.json"),
                &token,
                json!({}),
            )
            .await;
        jobs.push((base, id, enqueued));
    }
    for (_, _, enqueued) in &jobs[..10] {
        assert_eq!(enqueued["result"][0]["status"], "Queued", "{enqueued}");
    }
    let (_, _, refused) = &jobs[10];
    assert_eq!(code(refused), "1029");
    assert_eq!(refused["errors"][0]["message"], "Too many jobs in queue");

    let listed = harness
        .get("/bulk/v1/leads/export.json?status=Queued,Processing", &token)
        .await;
    assert_eq!(listed["result"].as_array().unwrap().len(), 3, "{listed}");

    let (base, id, _) = &jobs[9];
    let cancelled = harness
        .post(
            &format!("/bulk/v1/{base}/export/{id}/cancel.json"),
            &token,
            json!({}),
        )
        .await;
    assert_eq!(cancelled["result"][0]["status"], "Cancelled");

    for (base, id, _) in &jobs[..9] {
        support::eventually(Duration::from_secs(10), async || {
            let status = harness
                .get(&format!("/bulk/v1/{base}/export/{id}/status.json"), &token)
                .await;
            match status["result"][0]["status"].as_str() {
                Some("Completed") => Ok(()),
                _ => Err(status),
            }
        })
        .await;
    }
    let stats = harness.sim.stats().bulk.extract;
    assert_eq!((stats.max_processing, stats.max_in_queue), (2, 10));
    assert_eq!(stats.max_queued, 8);
    assert_eq!(
        (
            stats.enqueued,
            stats.completed,
            stats.cancelled,
            stats.refused_full
        ),
        (10, 9, 1, 1)
    );
    assert!(
        stats
            .samples
            .iter()
            .all(|sample| sample.processing <= 2 && sample.queued <= 8)
    );
    let last = stats.samples.last().unwrap();
    assert_eq!((last.queued, last.processing), (0, 0));
}

#[tokio::test]
async fn exports_stop_at_the_daily_bytes_with_1029_and_imports_have_their_own_queue() {
    let harness = Harness::start(SimConfig {
        export_time: Duration::from_millis(50),
        import_time: Duration::from_secs(60),
        export_daily_bytes: 1,
        ..quick_config()
    })
    .await;
    let token = harness.token().await;
    let id = harness.create_export("leads", &token).await;
    harness
        .post(
            &format!("/bulk/v1/leads/export/{id}/enqueue.json"),
            &token,
            json!({}),
        )
        .await;
    let status = support::eventually(Duration::from_secs(5), async || {
        let status = harness
            .get(&format!("/bulk/v1/leads/export/{id}/status.json"), &token)
            .await;
        match status["result"][0]["status"].as_str() {
            Some("Completed") => Ok(status),
            _ => Err(status),
        }
    })
    .await;
    assert!(status["result"][0]["fileSize"].as_u64().unwrap() > 1);
    let refused = harness
        .post("/bulk/v1/activities/export/create.json", &token, json!({}))
        .await;
    assert_eq!(code(&refused), "1029");
    assert_eq!(refused["errors"][0]["message"], "Export daily quota exceeded");

    let import = |path: &'static str| {
        harness
            .http
            .post(harness.url(path))
            .bearer_auth(&token)
            .header("content-type", "multipart/form-data; boundary=XyZ")
            .body("--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"l.csv\"\r\n\r\nemail\r\n--XyZ--\r\n")
            .send()
    };
    let mut batches = Vec::new();
    for path in ["/bulk/v1/leads.json", "/bulk/v1/customobjects/car_c/import.json"]
        .into_iter()
        .cycle()
        .take(10)
    {
        let answer: Value = import(path).await.unwrap().json().await.unwrap();
        assert_eq!(
            code(&answer),
            "ok",
            "the export quota does not touch imports: {answer}"
        );
        batches.push(answer["result"][0]["batchId"].as_u64().unwrap());
    }
    let full: Value = import("/bulk/v1/program/1044/members/import.json")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(code(&full), "1016");
    assert_eq!(full["errors"][0]["message"], "Too many imports");
    let status = harness
        .get(&format!("/bulk/v1/leads/batch/{}.json", batches[0]), &token)
        .await;
    assert_eq!(status["result"][0]["status"], "Importing");
    let stats = harness.sim.stats().bulk;
    assert_eq!((stats.import.max_processing, stats.import.max_queued), (2, 8));
    assert_eq!(stats.extract.completed, 1);
}

// ------------------------------------------------------------------- usage

#[tokio::test]
async fn usage_counts_calls_per_api_user() {
    let harness = Harness::start(SimConfig {
        clients: vec![SimClient::demo(), other_client()],
        ..quick_config()
    })
    .await;
    let demo = harness.token().await;
    let other = harness.token_for(&other_client()).await;
    for _ in 0..3 {
        harness.get(LEAD_ONE, &demo).await;
    }
    for _ in 0..2 {
        harness.get(LEAD_ONE, &other).await;
    }

    let usage = harness.get("/rest/v1/stats/usage.json", &demo).await;

    assert_eq!(code(&usage), "ok");
    let today = &usage["result"][0];
    assert_eq!(today["total"], 6, "five lead calls and the usage call: {usage}");
    assert_eq!(
        today["users"],
        json!([{"userId": "demo@example.com", "count": 4}, {"userId": "other@example.com", "count": 2}])
    );
}

#[tokio::test]
async fn usage_date_is_today_in_the_configured_timezone() {
    // UTC+14 and UTC-11 are never on the same date.
    for timezone in [chrono_tz::Pacific::Kiritimati, chrono_tz::Pacific::Pago_Pago] {
        let harness = Harness::start(SimConfig {
            timezone,
            ..quick_config()
        })
        .await;
        let token = harness.token().await;
        let today = || {
            chrono::Utc::now()
                .with_timezone(&timezone)
                .date_naive()
                .to_string()
        };
        let before = today();

        let usage = harness.get("/rest/v1/stats/usage.json", &token).await;

        let date = usage["result"][0]["date"].as_str().unwrap();
        assert!(
            date == before || date == today(),
            "{date} is not today in {timezone}"
        );
    }
}

#[tokio::test]
async fn foreign_usage_counts_toward_the_daily_quota() {
    let harness = Harness::start(SimConfig {
        daily_quota: 10,
        ..quick_config()
    })
    .await;
    let token = harness.token().await;
    harness
        .sim
        .simulator()
        .add_foreign_usage("someone@example.com", 8);
    let response = harness
        .http
        .post(harness.url("/_sim/usage"))
        .json(&json!({"user": "someone@example.com", "calls": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let usage = harness.get("/rest/v1/stats/usage.json", &token).await;
    assert_eq!(usage["result"][0]["total"], 10);
    assert_eq!(code(&harness.get(LEAD_ONE, &token).await), "607");
}

// ------------------------------------------------------------------ faults

#[tokio::test]
async fn fail_next_answers_the_injected_code_in_http_200_then_recovers() {
    let harness = Harness::start(quick_config()).await;
    let token = harness.token().await;
    harness.sim.inject(fail_next(
        2,
        Failure {
            code: Some("606".into()),
            ..Failure::default()
        },
    ));

    assert_eq!(code(&harness.get(LEAD_ONE, &token).await), "606");
    assert_eq!(code(&harness.get(LEAD_ONE, &token).await), "606");
    assert_eq!(code(&harness.get(LEAD_ONE, &token).await), "ok");
    assert_eq!(harness.sim.stats().code("606"), 2);
}

#[tokio::test]
async fn fail_next_posted_as_json_answers_a_bare_http_status_or_a_code() {
    let harness = Harness::start(quick_config()).await;
    let token = harness.token().await;
    assert_eq!(
        harness
            .post_faults(json!({"fail_next": {"count": 1, "http_status": 503}}))
            .await,
        StatusCode::OK
    );
    assert_eq!(
        harness
            .post_faults(json!({"fail_next": {"count": 1, "code": "615"}}))
            .await,
        StatusCode::OK
    );

    let response = harness
        .http
        .get(harness.url(LEAD_ONE))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(code(&harness.get(LEAD_ONE, &token).await), "615");
    assert_eq!(code(&harness.get(LEAD_ONE, &token).await), "ok");
    let stats = harness.sim.stats();
    assert_eq!((stats.code("http_503"), stats.code("615")), (1, 1));
}

#[tokio::test]
async fn fail_next_answers_a_given_body_or_pads_the_answer_with_a_large_header() {
    let harness = Harness::start(quick_config()).await;
    let token = harness.token().await;
    for faults in [
        json!({"fail_next": {"count": 1, "body": "{\"success\":"}}),
        json!({"fail_next": {"count": 1, "http_status": 502, "body": "{\"success\":false}"}}),
        json!({"fail_next": {"count": 1, "header_bytes": 61440}}),
    ] {
        assert_eq!(harness.post_faults(faults).await, StatusCode::OK);
    }
    let send = || harness.http.get(harness.url(LEAD_ONE)).bearer_auth(&token).send();

    let invalid = send().await.unwrap();
    assert_eq!(invalid.status(), StatusCode::OK);
    assert_eq!(invalid.text().await.unwrap(), "{\"success\":", "as it was given");
    let without_errors = send().await.unwrap();
    assert_eq!(without_errors.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(without_errors.text().await.unwrap(), "{\"success\":false}");
    let padded = send().await.unwrap();
    assert_eq!(padded.headers()["x-sim-padding"].len(), 61440);
    assert_eq!(code(&padded.json().await.unwrap()), "ok", "the call's own answer");
    let stats = harness.sim.stats();
    assert_eq!((stats.code("body"), stats.code("http_502"), stats.ok), (1, 1, 1));
}

#[tokio::test]
async fn revoked_tokens_get_601_and_identity_issues_a_new_one() {
    let harness = Harness::start(quick_config()).await;
    let old = harness.token().await;
    harness.sim.inject(Faults {
        revoke_tokens: true,
        ..Faults::default()
    });

    assert_eq!(code(&harness.get(LEAD_ONE, &old).await), "601");
    let new = harness.token().await;
    assert_ne!(new, old);
    assert_eq!(code(&harness.get(LEAD_ONE, &new).await), "ok");
}

#[tokio::test]
async fn expired_tokens_get_602_and_identity_issues_a_new_one() {
    let harness = Harness::start(quick_config()).await;
    let old = harness.token().await;
    assert_eq!(
        harness.post_faults(json!({"expire_tokens": true})).await,
        StatusCode::OK
    );

    assert_eq!(code(&harness.get(LEAD_ONE, &old).await), "602");
    let new = harness.token().await;
    assert_ne!(new, old);
    assert_eq!(code(&harness.get(LEAD_ONE, &new).await), "ok");
}

#[tokio::test]
async fn drop_next_closes_the_connection_without_an_answer() {
    let harness = Harness::start(quick_config()).await;
    let token = harness.token().await;
    assert_eq!(harness.post_faults(json!({"drop_next": 1})).await, StatusCode::OK);

    let dropped = harness
        .http
        .get(harness.url(LEAD_ONE))
        .bearer_auth(&token)
        .send()
        .await;

    let error = dropped.expect_err("a dropped connection has no answer");
    assert!(!error.is_timeout(), "{error:?}");
    assert_eq!(code(&harness.get(LEAD_ONE, &token).await), "ok");
    let stats = harness.sim.stats();
    assert_eq!((stats.code("dropped"), stats.ok), (1, 1));
}

#[tokio::test]
async fn hang_next_never_answers_so_the_client_times_out() {
    let harness = Harness::start(quick_config()).await;
    let token = harness.token().await;
    harness.sim.inject(Faults {
        hang_next: 1,
        ..Faults::default()
    });

    let hung = harness
        .http
        .get(harness.url(LEAD_ONE))
        .bearer_auth(&token)
        .timeout(Duration::from_millis(300))
        .send()
        .await;

    assert!(hung.expect_err("a hung call has no answer").is_timeout());
    assert_eq!(code(&harness.get(LEAD_ONE, &token).await), "ok");
    assert_eq!(harness.sim.stats().code("hung"), 1);
}

#[tokio::test]
async fn extra_latency_slows_every_call_until_it_is_reset() {
    let harness = Harness::start(quick_config()).await;
    let token = harness.token().await;
    let extra = Duration::from_millis(300);
    assert_eq!(
        harness.post_faults(json!({"extra_latency": "300ms"})).await,
        StatusCode::OK
    );

    for _ in 0..2 {
        let start = Instant::now();
        assert_eq!(code(&harness.get(LEAD_ONE, &token).await), "ok");
        assert!(start.elapsed() >= extra, "answered in {:?}", start.elapsed());
    }

    harness.sim.inject(Faults {
        extra_latency: Some(Duration::ZERO),
        ..Faults::default()
    });
    let start = Instant::now();
    assert_eq!(code(&harness.get(LEAD_ONE, &token).await), "ok");
    assert!(start.elapsed() < extra, "still slow: {:?}", start.elapsed());
}

#[tokio::test]
async fn identity_fail_next_answers_http_503_then_issues_tokens() {
    let harness = Harness::start(quick_config()).await;
    harness.sim.inject(Faults {
        identity_fail_next: 1,
        ..Faults::default()
    });

    let (status, answer) = harness.token_answer(&SimClient::demo()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer["error"], "temporarily_unavailable");

    assert_eq!(
        harness.post_faults(json!({"identity_fail_next": 1})).await,
        StatusCode::OK
    );
    let (status, _) = harness.token_answer(&SimClient::demo()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    let token = harness.token().await;
    assert_eq!(code(&harness.get(LEAD_ONE, &token).await), "ok");
    assert_eq!(harness.sim.stats().identity_calls, 3);
}

#[tokio::test]
async fn faults_endpoint_rejects_unknown_fields_with_http_400() {
    let harness = Harness::start(quick_config()).await;

    assert_eq!(
        harness.post_faults(json!({"drop_nxet": 1})).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        harness
            .post_faults(json!({"fail_next": {"count": 1, "cdoe": "606"}}))
            .await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        harness.post_faults(json!({"extra_latency": "soon"})).await,
        StatusCode::BAD_REQUEST
    );

    let token = harness.token().await;
    assert_eq!(
        code(&harness.get(LEAD_ONE, &token).await),
        "ok",
        "nothing was injected"
    );
}

#[tokio::test]
async fn sim_stats_endpoint_reports_counters_and_arrivals_as_json() {
    let harness = Harness::start(quick_config()).await;
    let token = harness.token().await;
    harness.get(LEAD_ONE, &token).await;
    harness.get(LEAD_ONE, "stale:sim").await;

    let response = harness.http.get(harness.url("/_sim/stats")).send().await.unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    let raw: Value = response.json().await.unwrap();
    assert_eq!(raw["identity_calls"], 1);
    assert_eq!(raw["calls"], 2);
    assert_eq!(raw["ok"], 1);
    assert_eq!(raw["codes"], json!({"601": 1}));
    assert_eq!(raw["max_in_flight"], 1);
    assert_eq!(raw["max_in_window"], 1);
    assert_eq!(raw["max_admitted_in_flight"], 1);
    assert_eq!(raw["max_admitted_in_window"], 1);
    assert_eq!(raw["access_token_params"], 0);
    assert_eq!(raw["in_flight"], 0, "both calls are over");
    assert_eq!(raw["used_today"], 1, "the 601 does not count");
    let stats: Stats = serde_json::from_value(raw).unwrap();
    let arrivals = &stats.arrivals;
    assert_eq!(arrivals.len(), 2, "control calls are not arrivals");
    assert_eq!(arrivals[0].user.as_deref(), Some("demo@example.com"));
    assert_eq!(
        (arrivals[0].method.as_str(), arrivals[0].target.as_str()),
        ("GET", LEAD_ONE)
    );
    assert_eq!(arrivals[0].code, "ok");
    assert_eq!(
        (arrivals[1].user.as_deref(), arrivals[1].code.as_str()),
        (None, "601")
    );
    assert!(arrivals[0].at >= 0.0 && arrivals[0].at <= arrivals[1].at);
}

// ------------------------------------------------------ access_token param

#[tokio::test]
async fn access_token_query_parameter_is_accepted_and_counted() {
    let harness = Harness::start(quick_config()).await;
    let token = harness.token().await;

    let response = harness
        .http
        .get(harness.url(LEAD_ONE))
        .query(&[("access_token", token.as_str())])
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(code(&body), "ok");
    assert_eq!(body["result"][0]["id"], 1);
    assert_eq!(harness.sim.stats().access_token_params, 1);

    harness.get(LEAD_ONE, &token).await;
    assert_eq!(
        harness.sim.stats().access_token_params,
        1,
        "a bearer header is not counted"
    );
}

#[tokio::test]
async fn access_token_in_a_form_body_is_accepted_and_counted() {
    let harness = Harness::start(quick_config()).await;
    let token = harness.token().await;

    let response = harness
        .http
        .post(harness.url("/rest/v1/leads.json?_method=GET"))
        .form(&[
            ("access_token", token.as_str()),
            ("filterType", "id"),
            ("filterValues", "4"),
        ])
        .send()
        .await
        .unwrap();

    let body: Value = response.json().await.unwrap();
    assert_eq!(code(&body), "ok");
    assert_eq!(body["result"][0]["email"], "lead4@example.com");
    assert_eq!(harness.sim.stats().access_token_params, 1);
}

#[tokio::test]
async fn access_token_in_a_multipart_field_is_counted() {
    let harness = Harness::start(quick_config()).await;
    let token = harness.token().await;
    let body = format!(
        "--XyZ\r\nContent-Disposition: form-data; name=\"access_token\"\r\n\r\n{token}\r\n\
         --XyZ\r\nContent-Disposition: form-data; name=\"format\"\r\n\r\ncsv\r\n--XyZ--\r\n"
    );

    let response = harness
        .http
        .post(harness.url("/bulk/v1/leads.json"))
        .bearer_auth(&token)
        .header("content-type", "multipart/form-data; boundary=XyZ")
        .body(body)
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(harness.sim.stats().access_token_params, 1);
}

// ------------------------------------------------------------- SimClient

#[test]
fn sim_client_parses_id_secret_user() {
    let client: SimClient = "crm-sync:s3cret:crm@example.com".parse().unwrap();
    assert_eq!(
        client,
        SimClient {
            client_id: "crm-sync".into(),
            client_secret: "s3cret".into(),
            user: "crm@example.com".into(),
        }
    );
}

#[test]
fn sim_client_rejects_missing_or_empty_parts() {
    for text in ["", "id", "id:secret", "id:secret:", ":secret:user", "id::user"] {
        assert_eq!(
            text.parse::<SimClient>(),
            Err("expected ID:SECRET:USER".to_owned()),
            "{text:?}"
        );
    }
}

#[test]
fn sim_client_user_keeps_everything_after_the_second_colon() {
    let client: SimClient = "id:secret:user:with:colons".parse().unwrap();
    assert_eq!(
        (client.client_secret.as_str(), client.user.as_str()),
        ("secret", "user:with:colons")
    );
}

#[test]
fn sim_config_defaults_are_marketo_limits_with_the_demo_client() {
    let config = SimConfig::default();
    assert_eq!(config.window_calls, 100);
    assert_eq!(config.window, Duration::from_secs(20));
    assert_eq!(config.concurrency, 10);
    assert_eq!(config.daily_quota, 50_000);
    assert_eq!(config.token_ttl, Duration::from_secs(3600));
    assert_eq!(config.timezone, chrono_tz::America::Chicago);
    assert_eq!(config.clients, vec![SimClient::demo()]);
}

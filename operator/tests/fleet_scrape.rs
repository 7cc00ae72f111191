//! The fleet scrape against real gateways (#14 item 1): 20 gateway servers
//! (the gateway library, memory broker, on loopback) with websocket clients,
//! one listener that accepts and never answers, one that is not a gateway.
//! The sums are exact, each broken page is one failure with its reason, and
//! the silent one costs its deadline, not more. The time of the whole
//! scrape is printed (docs/operations.md quotes it).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use high_templar_gateway::config::Config;
use high_templar_gateway::server::Server;
use high_templar_operator::scrape::{FleetScraper, PAGE_TIMEOUT};
use tokio_tungstenite::tungstenite::Message;

/// A backend allowing every user the room `{"user": 1}`.
async fn backend() -> String {
    let app = axum::Router::new()
        .route("/api/bootstrap/", axum::routing::get(|| async { r#"{"allowed_rooms": [{"user": 1}]}"# }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the backend");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/api/")
}

async fn gateway(backend_url: &str) -> std::net::SocketAddr {
    let yaml = format!("listen: 127.0.0.1:0\nbackend: {{url: '{backend_url}'}}\nlimits: {{maxConnections: 10}}\n");
    let config = Config::from_yaml(&yaml).unwrap_or_else(|(field, e)| panic!("test config: {field}: {e}"));
    let server = Server::bind(config).await.expect("the gateway binds");
    let addr = server.local_addr().expect("addr");
    tokio::spawn(server.run(std::future::pending::<()>()));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_gateways_are_summed_and_broken_pages_cost_their_deadline() {
    let backend_url = backend().await;
    let mut urls = Vec::new();
    let mut clients = Vec::new();
    for pod in 0..20u64 {
        let addr = gateway(&backend_url).await;
        urls.push(format!("http://{addr}/metrics"));
        // Pod n holds n % 5 clients, each subscribed once.
        for c in 0..pod % 5 {
            let (mut ws, _) =
                tokio_tungstenite::connect_async(format!("ws://{addr}/ws/?token=t{pod}-{c}")).await.expect("connect");
            let _auth = ws.next().await.expect("auth frame").expect("auth frame");
            let subscribe = r#"{"type": "subscribe", "room": {"user": 1}, "requestId": 1}"#;
            ws.send(Message::text(subscribe)).await.expect("subscribe");
            let reply = ws.next().await.expect("reply").expect("reply");
            assert!(reply.to_text().is_ok_and(|t| t.contains("success")), "{reply:?}");
            clients.push(ws);
        }
    }
    // Accepts, never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    urls.push(format!("http://{}/metrics", silent.local_addr().expect("addr")));
    let _held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            held.push(tcp);
        }
    });
    // Answers 200, but not a gateway's page.
    let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    urls.push(format!("http://{}/metrics", other.local_addr().expect("addr")));
    let app = axum::Router::new().route("/metrics", axum::routing::get(|| async { "up 1\n" }));
    tokio::spawn(async move { axum::serve(other, app).await });

    let scraper = FleetScraper::new().expect("the HTTP client");
    let started = Instant::now();
    let (figures, failure) = scraper.pages(urls.clone(), 10).await;
    let took = started.elapsed();
    let expected: u64 = (0..20).map(|p| p % 5).sum();
    assert_eq!((figures.connections, figures.subscriptions), (expected, expected), "{figures:?}");
    assert_eq!((figures.pods_read, figures.pods_failed), (20, 2), "{figures:?}");
    assert_eq!(figures.consumers, 0, "the memory broker is not RabbitMQ");
    assert_eq!(figures.max_pod_connections, 4);
    assert_eq!(figures.max_fill_percent, 40, "4 of maxConnections 10");
    assert!(failure.is_some(), "a failure is reported");
    // The silent page ends at its deadline; everything else is loopback.
    assert!(took >= PAGE_TIMEOUT && took < PAGE_TIMEOUT + Duration::from_secs(3), "{took:?}");

    // Without the two broken ones: the cost of 20 pages.
    let gateways: Vec<String> = urls[..20].to_vec();
    let mut runs = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let (figures, failure) = scraper.pages(gateways.clone(), 10).await;
        runs.push(started.elapsed());
        assert_eq!((figures.pods_read, figures.pods_failed, failure), (20, 0, None));
    }
    println!("fleet scrape of 20 gateways: {runs:?} (with a silent and a non-gateway one: {took:?})");
}

//! One handle over the three ways Redis is deployed: a single server, a
//! Redis Cluster, or a master found through Sentinel. The registry and the
//! offline store and durable intake talk to this, not to a concrete connection
//! type.
//!
//! URL forms (`registry.redis_url`):
//! - `redis://[user:pass@]host:port[/db]`: one server.
//! - `redis+cluster://[user:pass@]host:port,host:port,...`: seed nodes of a
//!   cluster; the rest of the topology is discovered.
//! - `redis+sentinel://[user:pass@]host:port,host:port,.../<master-name>[/db]`:
//!   sentinels to ask for the master of `<master-name>`; the credentials and
//!   db are for the master (the sentinels are reached without a password).
//!
//! `rediss`, `rediss+cluster` and `rediss+sentinel` are the same over TLS: to
//! the server, to every cluster node, to the sentinels and the master they
//! name. The server is verified against the public web roots, or only
//! against `registry.redis_ca_file` when it is set.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::{join_all, FutureExt};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    Cmd, ConnectionAddr, ErrorKind, FromRedisValue, IntoConnectionInfo, RedisError, RedisFuture,
    RedisResult, TlsCertificates, TlsMode, Value,
};
use tracing::{info, warn};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds the whole first connect (topology discovery, sentinel query).
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A Redis connection of any deployment; cheap to clone (clones share the
/// underlying multiplexed connections).
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConn),
    Sentinel(SentinelConn),
}

/// A cluster connection that is opened anew when requests keep failing:
/// redis-rs's own reconnect does not always recover once every node has
/// restarted (measured: lookups timed out for minutes afterwards).
#[derive(Clone)]
pub struct ClusterConn {
    client: Arc<ClusterClient>,
    conn: Arc<Mutex<ClusterConnection>>,
    /// Serialises rebuilds: one reconnect for a burst of failures.
    rebuilding: Arc<tokio::sync::Mutex<()>>,
}

/// The master that the sentinels named last; asked again when the master
/// stops answering or turns read-only (a failover demoted it).
#[derive(Clone)]
pub struct SentinelConn {
    sentinel: Arc<tokio::sync::Mutex<SentinelClient>>,
    master: Arc<Mutex<(ConnectionAddr, ConnectionManager)>>,
}

impl RedisConn {
    /// Connects according to the URL's scheme (see the module docs);
    /// `ca_file` (PEM) is the only CA trusted for `rediss` when given.
    pub async fn open(url: &str, ca_file: Option<&Path>) -> RedisResult<RedisConn> {
        let open = async {
            let certs = ca_file.map(load_ca).transpose()?;
            match Target::parse(url)? {
                Target::Single => {
                    let client = match certs {
                        Some(certs) => redis::Client::build_with_tls(url, certs)?,
                        None => redis::Client::open(url)?,
                    };
                    Ok(RedisConn::Single(manager(client).await?))
                }
                Target::Cluster(nodes) => {
                    let mut builder = ClusterClient::builder(nodes)
                        .connection_timeout(CONNECT_TIMEOUT)
                        .response_timeout(RESPONSE_TIMEOUT)
                        .retries(3);
                    if let Some(certs) = certs {
                        builder = builder.certs(certs);
                    }
                    let client = builder.build()?;
                    let conn = client.get_async_connection().await?;
                    Ok(RedisConn::Cluster(ClusterConn {
                        client: Arc::new(client),
                        conn: Arc::new(Mutex::new(conn)),
                        rebuilding: Arc::default(),
                    }))
                }
                Target::Sentinel(target) => {
                    let mut client = target.builder(certs)?.build()?;
                    let master = client.async_get_client().await?;
                    let addr = master.get_connection_info().addr.clone();
                    let conn = manager(master).await?;
                    Ok(RedisConn::Sentinel(SentinelConn {
                        sentinel: Arc::new(tokio::sync::Mutex::new(client)),
                        master: Arc::new(Mutex::new((addr, conn))),
                    }))
                }
            }
        };
        tokio::time::timeout(OPEN_TIMEOUT, open)
            .await
            .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            RedisConn::Single(_) => "redis",
            RedisConn::Cluster(_) => "redis cluster",
            RedisConn::Sentinel(_) => "redis sentinel",
        }
    }

    /// Runs independent single-key commands in one round trip where the
    /// deployment allows: a pipeline on one server; on a cluster, where a
    /// pipeline must stay within one slot (redis-rs rejects cross-slot
    /// pipelines), concurrent requests that the cluster connection
    /// multiplexes per node. Results come back in the order of `cmds`,
    /// one each: a command the server refused (e.g. WRONGTYPE) fails
    /// alone; a lost connection fails them all.
    pub async fn each<T: FromRedisValue>(
        &self,
        cmds: Vec<Cmd>,
    ) -> RedisResult<Vec<RedisResult<T>>> {
        let values: Vec<RedisResult<Value>> = match self {
            RedisConn::Cluster(c) => {
                let conn = c.current();
                let results = join_all(cmds.iter().map(|cmd| {
                    let mut conn = conn.clone();
                    async move { conn.req_packed_command(cmd).await }
                }))
                .await;
                let mut values = Vec::with_capacity(results.len());
                for result in results {
                    match result {
                        Err(e) if lost(&e) => {
                            let failed = Err(e);
                            c.check(&failed).await;
                            return failed;
                        }
                        other => values.push(other),
                    }
                }
                values
            }
            _ => {
                let count = cmds.len();
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                let replies = self.clone().req_packed_commands(&pipe, 0, count).await?;
                replies.into_iter().map(Ok).collect()
            }
        };
        Ok(values
            .into_iter()
            .map(|v| match v? {
                Value::ServerError(e) => Err(e.into()),
                v => T::from_owned_redis_value(v),
            })
            .collect())
    }
}

/// `registry.redis_ca_file`: PEM holding at least one certificate.
pub fn load_ca(path: &Path) -> RedisResult<TlsCertificates> {
    let problem = |p: String| {
        RedisError::from((
            ErrorKind::InvalidClientConfig,
            "registry.redis_ca_file",
            format!("{}: {p}", path.display()),
        ))
    };
    let pem = std::fs::read(path).map_err(|e| problem(e.to_string()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| problem(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(problem("holds no PEM certificate".into()));
    }
    Ok(TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    })
}

async fn manager(client: redis::Client) -> RedisResult<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_number_of_retries(3)
        .set_max_delay(1000)
        .set_connection_timeout(CONNECT_TIMEOUT)
        .set_response_timeout(RESPONSE_TIMEOUT);
    ConnectionManager::new_with_config(client, config).await
}

/// A failure after which a connection is worth opening anew.
fn lost(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.is_timeout()
        || e.kind() == ErrorKind::ClusterConnectionNotFound
}

impl ClusterConn {
    fn current(&self) -> ClusterConnection {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// After a request that failed as if the nodes were gone: opens the
    /// cluster connection anew (from the seeds). The request itself is not
    /// retried here; callers retry.
    async fn check<T>(&self, result: &RedisResult<T>) {
        if !result.as_ref().err().is_some_and(lost) {
            return;
        }
        let Ok(_one) = self.rebuilding.try_lock() else {
            return;
        };
        match tokio::time::timeout(OPEN_TIMEOUT, self.client.get_async_connection()).await {
            Ok(Ok(conn)) => {
                *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = conn;
                info!("redis cluster connection opened anew");
            }
            Ok(Err(e)) => warn!(error = %e, "redis cluster still unreachable"),
            Err(_) => warn!("redis cluster still unreachable: connect timed out"),
        }
    }
}

impl SentinelConn {
    fn current(&self) -> ConnectionManager {
        self.master
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    /// After a request: if it failed in a way that says the master moved
    /// (unreachable, or read-only because a failover demoted it), asks the
    /// sentinels again and switches when they name another address. The
    /// request itself is not retried here; callers retry batches.
    async fn check<T>(&self, result: &RedisResult<T>, replies: impl Fn(&T) -> Vec<&Value>) {
        let moved = match result {
            Err(e) => lost(e) || e.kind() == ErrorKind::ReadOnly,
            // Server errors arrive as values; READONLY is one.
            Ok(v) => replies(v)
                .into_iter()
                .any(|v| matches!(v, Value::ServerError(e) if e.code() == "READONLY")),
        };
        if !moved {
            return;
        }
        let mut sentinel = self.sentinel.lock().await;
        let client = match sentinel.async_get_client().await {
            Ok(c) => c,
            Err(e) => return warn!(error = %e, "sentinels did not name a master"),
        };
        let addr = client.get_connection_info().addr.clone();
        if self.master.lock().unwrap_or_else(|e| e.into_inner()).0 == addr {
            return;
        }
        match manager(client).await {
            Ok(conn) => {
                info!(master = %addr, "sentinels named a new master; switched");
                *self.master.lock().unwrap_or_else(|e| e.into_inner()) = (addr, conn);
            }
            Err(e) => warn!(master = %addr, error = %e, "cannot reach the new master"),
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => async move {
                let result = c.current().req_packed_command(cmd).await;
                c.check(&result).await;
                result
            }
            .boxed(),
            RedisConn::Sentinel(s) => async move {
                let result = s.current().req_packed_command(cmd).await;
                s.check(&result, |v| vec![v]).await;
                result
            }
            .boxed(),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => async move {
                let result = c
                    .current()
                    .req_packed_commands(pipeline, offset, count)
                    .await;
                c.check(&result).await;
                result
            }
            .boxed(),
            RedisConn::Sentinel(s) => async move {
                let result = s
                    .current()
                    .req_packed_commands(pipeline, offset, count)
                    .await;
                s.check(&result, |v| v.iter().collect()).await;
                result
            }
            .boxed(),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.current().get_db(),
            RedisConn::Sentinel(s) => s.current().get_db(),
        }
    }
}

/// What a `registry.redis_url` points at.
enum Target {
    Single,
    /// Node URLs, `rediss://` for TLS.
    Cluster(Vec<String>),
    Sentinel(SentinelTarget),
}

/// The sentinels, and the master's name, credentials and db.
struct SentinelTarget {
    sentinels: Vec<ConnectionAddr>,
    master: String,
    db: i64,
    username: Option<String>,
    password: Option<String>,
    tls: bool,
}

impl SentinelTarget {
    fn builder(self, certs: Option<TlsCertificates>) -> RedisResult<SentinelClientBuilder> {
        let mut b =
            SentinelClientBuilder::new(self.sentinels, self.master, SentinelServerType::Master)?
                .set_client_to_redis_db(self.db);
        if let Some(user) = self.username {
            b = b.set_client_to_redis_username(user);
        }
        if let Some(pass) = self.password {
            b = b.set_client_to_redis_password(pass);
        }
        if self.tls {
            b = b.set_client_to_redis_tls_mode(TlsMode::Secure);
        }
        if let Some(certs) = certs {
            b = b
                .set_client_to_sentinel_certificates(certs.clone())
                .set_client_to_redis_certificates(certs);
        }
        Ok(b)
    }
}

fn invalid(url: &str, problem: &str) -> RedisError {
    let url = redact(url);
    RedisError::from((
        ErrorKind::InvalidClientConfig,
        "invalid redis url",
        format!("{url}: {problem}"),
    ))
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}://{user}:***{}", &url[..s], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl Target {
    fn parse(url: &str) -> RedisResult<Target> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid(url, "no scheme"))?;
        let (cluster, tls) = match scheme {
            "redis+cluster" => (true, false),
            "rediss+cluster" => (true, true),
            "redis+sentinel" => (false, false),
            "rediss+sentinel" => (false, true),
            _ => return Ok(Target::Single),
        };
        let node_scheme = if tls { "rediss" } else { "redis" };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let hosts: Vec<&str> = hosts.split(',').map(str::trim).collect();
        if hosts.iter().any(|h| h.is_empty()) {
            return Err(invalid(url, "empty host in the host list"));
        }
        let path: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        if cluster {
            if !path.is_empty() {
                return Err(invalid(url, "a cluster has no database number or path"));
            }
            let auth = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
            let nodes = hosts
                .iter()
                .map(|h| format!("{node_scheme}://{auth}{h}"))
                .collect();
            return Ok(Target::Cluster(nodes));
        }
        let (master, db) = match path.as_slice() {
            [master] => (*master, 0),
            [master, db] => (
                *master,
                db.parse()
                    .map_err(|_| invalid(url, "the database must be a number"))?,
            ),
            _ => {
                return Err(invalid(
                    url,
                    "expected /<master-name>[/<db>] after the hosts",
                ))
            }
        };
        let sentinels = hosts
            .iter()
            .map(|h| {
                format!("{node_scheme}://{h}")
                    .into_connection_info()
                    .map(|info| info.addr)
                    .map_err(|e| invalid(url, &format!("sentinel {h}: {e}")))
            })
            .collect::<RedisResult<Vec<ConnectionAddr>>>()?;
        let (username, password) = match userinfo {
            Some(u) => match u.split_once(':') {
                Some((user, pass)) => (
                    Some(user).filter(|u| !u.is_empty()).map(str::to_owned),
                    Some(pass.to_owned()),
                ),
                None => (Some(u.to_owned()), None),
            },
            None => (None, None),
        };
        Ok(Target::Sentinel(SentinelTarget {
            sentinels,
            master: master.to_owned(),
            db,
            username,
            password,
            tls,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_url_forms() {
        assert!(matches!(Target::parse("redis://h:1/2"), Ok(Target::Single)));
        assert!(matches!(
            Target::parse("rediss://h:1/2"),
            Ok(Target::Single)
        ));
        let Ok(Target::Cluster(nodes)) = Target::parse("redis+cluster://u:p@a:1, b:2") else {
            panic!("cluster url");
        };
        assert_eq!(nodes, ["redis://u:p@a:1", "redis://u:p@b:2"]);
        let Ok(Target::Cluster(nodes)) = Target::parse("rediss+cluster://a:1") else {
            panic!("tls cluster url");
        };
        assert_eq!(nodes, ["rediss://a:1"]);
        let Ok(Target::Sentinel(s)) =
            Target::parse("redis+sentinel://:pw@s1:26379,s2:26379/mymaster/3")
        else {
            panic!("sentinel url");
        };
        assert_eq!(
            s.sentinels,
            [
                ConnectionAddr::Tcp("s1".into(), 26379),
                ConnectionAddr::Tcp("s2".into(), 26379)
            ]
        );
        assert_eq!(s.master, "mymaster");
        assert_eq!(
            (s.db, s.username, s.password.as_deref(), s.tls),
            (3, None, Some("pw"), false)
        );
        let Ok(Target::Sentinel(s)) = Target::parse("rediss+sentinel://u@s1:1/m") else {
            panic!("tls sentinel url");
        };
        assert!(
            matches!(&s.sentinels[..], [ConnectionAddr::TcpTls { host, port: 1, .. }] if host == "s1")
        );
        assert_eq!(
            (s.username.as_deref(), s.password, s.tls),
            (Some("u"), None, true)
        );
    }

    #[test]
    fn ca_file_problems_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let not_pem = dir.path().join("key.txt");
        std::fs::write(&not_pem, "not a certificate").unwrap();
        for (path, problem) in [(&missing, "No such file"), (&not_pem, "no PEM certificate")] {
            let Err(e) = load_ca(path) else {
                panic!("{} accepted", path.display());
            };
            let msg = e.to_string();
            assert!(
                msg.contains(&path.display().to_string()) && msg.contains(problem),
                "{msg}"
            );
        }
    }

    #[test]
    fn bad_urls_name_the_problem_without_the_password() {
        for (url, problem) in [
            ("redis+cluster://u:secret@a:1,,b:2", "empty host"),
            ("redis+cluster://a:1/0", "no database"),
            ("redis+sentinel://a:1", "master-name"),
            ("redis+sentinel://a:1/m/x", "must be a number"),
            ("rediss+sentinel://a:x/m", "sentinel a:x"),
        ] {
            let Err(e) = Target::parse(url) else {
                panic!("{url} accepted");
            };
            let msg = e.to_string();
            assert!(msg.contains(problem), "{url}: {msg}");
            assert!(!msg.contains("secret"), "{msg}");
        }
        assert_eq!(
            redact("redis+cluster://u:secret@a:1"),
            "redis+cluster://u:***@a:1"
        );
    }
}

//! The hub's SQL connection: SQLite (the embedded default, a file in the hub's directory)
//! or PostgreSQL (for several hub processes on several machines), behind one small API in
//! the shape of rusqlite's (`execute`, `query_row`, `prepare(..).query_map`, `optional`),
//! so every query of the store is written once.
//!
//! Queries are written in the dialect both accept, with SQLite's `?N` placeholders, which
//! are rewritten to PostgreSQL's `$N`. Integers are 64-bit on both (`BIGINT` columns in
//! PostgreSQL); flags are integers 0 and 1; a condition such as `EXISTS(..)` reads as a
//! `bool` from either.
//!
//! Transactions are statements (`BEGIN`, `COMMIT`, `ROLLBACK`) on the one connection a
//! [`Tx`] holds locked: a write transaction takes SQLite's write lock at once (`BEGIN
//! IMMEDIATE`) or PostgreSQL's transaction-scoped advisory lock [`WRITE_LOCK`], so writes
//! are serialised across every hub process sharing the database, as SQLite serialises them.
//!
//! The PostgreSQL client is synchronous and drives its own runtime, which Tokio forbids on
//! a thread already driving asynchronous tasks; a statement issued from such a thread runs
//! on a short-lived scoped thread instead.

use std::cell::RefCell;
use std::sync::{Mutex, MutexGuard};

use rusqlite::types::ValueRef;

use super::HubError;

/// The advisory lock id every write transaction takes on PostgreSQL.
pub(crate) const WRITE_LOCK: i64 = 0x7465_7373_6572_6101;

/// A failed statement.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DbError {
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{}", pg_message(.0))]
    Postgres(#[from] postgres::Error),
    #[error("query returned no rows")]
    NoRows,
    /// A text value holds U+0000, which PostgreSQL cannot store (refused on both backends,
    /// so they take the same input).
    #[error("a text value holds a NUL character (U+0000), which the hub does not store")]
    Nul,
    #[error("column {column}: {why}")]
    Type { column: usize, why: String },
    /// The connection string's TLS settings (see `tls.rs`).
    #[error("--database: {0}")]
    Tls(String),
}

/// A PostgreSQL error with the server's message (the error's own text is "db error").
fn pg_message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => {
            format!("{}: {}{}", d.code().code(), d.message(), d.detail().map(|x| format!(" ({x})")).unwrap_or_default())
        }
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text = format!("{text}: {s}");
                source = s.source();
            }
            text
        }
    }
}

impl DbError {
    /// True when SQLite refused a lock without waiting for it (another process holds it).
    pub(crate) fn is_busy(&self) -> bool {
        matches!(
            self,
            DbError::Sqlite(e) if matches!(
                e.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            )
        )
    }
}

impl From<DbError> for HubError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Nul => HubError::BadRequest(e.to_string()),
            e => HubError::Storage(e.to_string()),
        }
    }
}

/// `query_row(..).optional()`: no row is `None`.
pub(crate) trait OptionalExtension<T> {
    fn optional(self) -> Result<Option<T>, DbError>;
}

impl<T> OptionalExtension<T> for Result<T, DbError> {
    fn optional(self) -> Result<Option<T>, DbError> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(DbError::NoRows) | Err(DbError::Sqlite(rusqlite::Error::QueryReturnedNoRows)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A statement parameter.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Param {
    Int(Option<i64>),
    Text(Option<String>),
    Real(Option<f64>),
}

/// A value that can be a statement parameter (the macro [`params!`] takes each by
/// reference, as rusqlite's does).
pub(crate) trait ToParam {
    fn to_param(&self) -> Param;
}

impl<T: ToParam + ?Sized> ToParam for &T {
    fn to_param(&self) -> Param {
        (**self).to_param()
    }
}
impl ToParam for i64 {
    fn to_param(&self) -> Param {
        Param::Int(Some(*self))
    }
}
impl ToParam for i32 {
    fn to_param(&self) -> Param {
        Param::Int(Some(i64::from(*self)))
    }
}
impl ToParam for u32 {
    fn to_param(&self) -> Param {
        Param::Int(Some(i64::from(*self)))
    }
}
impl ToParam for bool {
    fn to_param(&self) -> Param {
        Param::Int(Some(i64::from(*self)))
    }
}
impl ToParam for f64 {
    fn to_param(&self) -> Param {
        Param::Real(Some(*self))
    }
}
impl ToParam for str {
    fn to_param(&self) -> Param {
        Param::Text(Some(self.to_owned()))
    }
}
impl ToParam for String {
    fn to_param(&self) -> Param {
        Param::Text(Some(self.clone()))
    }
}
impl ToParam for Option<String> {
    fn to_param(&self) -> Param {
        Param::Text(self.clone())
    }
}
impl ToParam for Option<&str> {
    fn to_param(&self) -> Param {
        Param::Text(self.map(str::to_owned))
    }
}
impl ToParam for Option<i64> {
    fn to_param(&self) -> Param {
        Param::Int(*self)
    }
}
impl ToParam for Param {
    fn to_param(&self) -> Param {
        self.clone()
    }
}

impl rusqlite::ToSql for Param {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value, ValueRef};
        Ok(match self {
            Param::Int(Some(v)) => ToSqlOutput::Owned(Value::Integer(*v)),
            Param::Real(Some(v)) => ToSqlOutput::Owned(Value::Real(*v)),
            Param::Text(Some(v)) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
            Param::Int(None) | Param::Real(None) | Param::Text(None) => ToSqlOutput::Owned(Value::Null),
        })
    }
}

impl Param {
    fn as_pg(&self) -> &(dyn postgres::types::ToSql + Sync) {
        match self {
            Param::Int(v) => v,
            Param::Text(v) => v,
            Param::Real(v) => v,
        }
    }
}

/// Statement parameters: `params![a, b]`, each converted with [`Param::from`].
macro_rules! params {
    () => {
        &[] as &[$crate::store::db::Param]
    };
    ($($e:expr),+ $(,)?) => {
        &[$($crate::store::db::ToParam::to_param(&$e)),+] as &[$crate::store::db::Param]
    };
}
pub(crate) use params;

/// A value a column can be read as.
pub(crate) trait Column: Sized {
    fn from_lite(v: ValueRef<'_>) -> Result<Self, String>;
    fn from_pg(row: &postgres::Row, i: usize) -> Result<Self, String>;
}

fn pg_int(row: &postgres::Row, i: usize) -> Result<Option<i64>, String> {
    use postgres::types::Type;
    let ty = row.columns()[i].type_().clone();
    let e = |e: postgres::Error| e.to_string();
    Ok(match ty {
        Type::INT8 => row.try_get::<_, Option<i64>>(i).map_err(e)?,
        Type::INT4 => row.try_get::<_, Option<i32>>(i).map_err(e)?.map(i64::from),
        Type::INT2 => row.try_get::<_, Option<i16>>(i).map_err(e)?.map(i64::from),
        Type::BOOL => row.try_get::<_, Option<bool>>(i).map_err(e)?.map(i64::from),
        other => return Err(format!("{other} is not an integer")),
    })
}

impl Column for i64 {
    fn from_lite(v: ValueRef<'_>) -> Result<Self, String> {
        v.as_i64().map_err(|e| e.to_string())
    }
    fn from_pg(row: &postgres::Row, i: usize) -> Result<Self, String> {
        pg_int(row, i)?.ok_or_else(|| "null".to_owned())
    }
}

impl Column for bool {
    fn from_lite(v: ValueRef<'_>) -> Result<Self, String> {
        v.as_i64().map(|v| v != 0).map_err(|e| e.to_string())
    }
    fn from_pg(row: &postgres::Row, i: usize) -> Result<Self, String> {
        pg_int(row, i)?.map(|v| v != 0).ok_or_else(|| "null".to_owned())
    }
}

impl Column for f64 {
    fn from_lite(v: ValueRef<'_>) -> Result<Self, String> {
        match v {
            ValueRef::Integer(i) => Ok(i as f64),
            other => other.as_f64().map_err(|e| e.to_string()),
        }
    }
    fn from_pg(row: &postgres::Row, i: usize) -> Result<Self, String> {
        use postgres::types::Type;
        match row.columns()[i].type_() {
            &Type::FLOAT8 => row.try_get::<_, f64>(i).map_err(|e| e.to_string()),
            _ => Ok(i64::from_pg(row, i)? as f64),
        }
    }
}

impl Column for String {
    fn from_lite(v: ValueRef<'_>) -> Result<Self, String> {
        v.as_str().map(str::to_owned).map_err(|e| e.to_string())
    }
    fn from_pg(row: &postgres::Row, i: usize) -> Result<Self, String> {
        row.try_get::<_, String>(i).map_err(|e| e.to_string())
    }
}

impl<T: Column> Column for Option<T> {
    fn from_lite(v: ValueRef<'_>) -> Result<Self, String> {
        match v {
            ValueRef::Null => Ok(None),
            v => T::from_lite(v).map(Some),
        }
    }
    fn from_pg(row: &postgres::Row, i: usize) -> Result<Self, String> {
        let null = row.try_get::<_, IsNull>(i).map_err(|e| e.to_string())?.0;
        if null { Ok(None) } else { T::from_pg(row, i).map(Some) }
    }
}

/// Reads whether a value is SQL null, whatever its type.
struct IsNull(bool);

impl<'a> postgres::types::FromSql<'a> for IsNull {
    fn from_sql(_: &postgres::types::Type, _: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(IsNull(false))
    }
    fn from_sql_null(_: &postgres::types::Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(IsNull(true))
    }
    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }
}

/// A row of a result.
pub(crate) enum Row<'r> {
    Lite(&'r rusqlite::Row<'r>),
    Pg(&'r postgres::Row),
}

/// A column index (rusqlite's `get::<_, T>` shape).
pub(crate) trait RowIndex {
    fn index(self) -> usize;
}
impl RowIndex for usize {
    fn index(self) -> usize {
        self
    }
}

impl Row<'_> {
    /// Column `i` as a `T`.
    pub(crate) fn get<I: RowIndex, T: Column>(&self, i: I) -> Result<T, DbError> {
        let i = i.index();
        match self {
            Row::Lite(r) => T::from_lite(r.get_ref(i)?),
            Row::Pg(r) => {
                if i >= r.len() {
                    return Err(DbError::Type { column: i, why: "no such column".into() });
                }
                T::from_pg(r, i)
            }
        }
        .map_err(|why| DbError::Type { column: i, why })
    }

    /// The value of column `i` as JSON (for dumps): integers, reals, text and null.
    pub(crate) fn json(&self, i: usize) -> Result<serde_json::Value, DbError> {
        use serde_json::Value;
        let bad = |why: String| DbError::Type { column: i, why };
        match self {
            Row::Lite(r) => Ok(match r.get_ref(i)? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(x) => Value::from(x),
                ValueRef::Real(x) => Value::from(x),
                ValueRef::Text(t) => Value::String(String::from_utf8_lossy(t).into_owned()),
                ValueRef::Blob(_) => return Err(bad("holds bytes".into())),
            }),
            Row::Pg(r) => {
                use postgres::types::Type;
                let ty = r.columns()[i].type_().clone();
                Ok(match ty {
                    Type::INT8 | Type::INT4 | Type::INT2 | Type::BOOL => {
                        pg_int(r, i).map_err(bad)?.map_or(Value::Null, Value::from)
                    }
                    Type::FLOAT8 => r.try_get::<_, Option<f64>>(i)?.map_or(Value::Null, Value::from),
                    Type::TEXT | Type::VARCHAR => r.try_get::<_, Option<String>>(i)?.map_or(Value::Null, Value::String),
                    other => return Err(bad(format!("type {other}"))),
                })
            }
        }
    }
}

/// Runs `f` where the synchronous PostgreSQL client may block: on this thread, or on a
/// scoped thread when this one drives Tokio tasks.
pub(crate) fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| s.spawn(f).join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    } else {
        f()
    }
}

/// `?N` and `?` placeholders as PostgreSQL's `$N` (outside quoted text).
pub(crate) fn pg_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut quoted = false;
    let mut next = 1;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                quoted = !quoted;
                out.push(c);
            }
            '?' if !quoted => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    digits.push(*d);
                    chars.next();
                }
                if digits.is_empty() {
                    digits = next.to_string();
                    next += 1;
                }
                out.push('$');
                out.push_str(&digits);
            }
            c => out.push(c),
        }
    }
    out
}

/// How long a statement waits for a lock (the write lock included) before it fails: the
/// same order as SQLite's busy wait, so a stuck writer elsewhere cannot hold a request, and
/// the thread serving it, for good.
const LOCK_TIMEOUT: &str = "30s";

/// Connects to PostgreSQL, over TLS as the connection string's `sslmode` and
/// `sslrootcert` say (libpq's parameters; see `tls.rs`).
pub(crate) fn connect(url: &str) -> Result<postgres::Client, DbError> {
    let settings = super::tls::settings(url).map_err(DbError::Tls)?;
    let tls = match settings.mode {
        super::tls::SslMode::Disable => None,
        _ => Some(super::tls::connector(&settings).map_err(DbError::Tls)?),
    };
    Ok(off_runtime(|| {
        let mut config: postgres::Config = settings.url.parse()?;
        // The server's notices (a table that exists already, at every start of a second
        // process) are for debugging, not the hub's log.
        config.notice_callback(|n| tracing::debug!(severity = n.severity(), "{}", n.message()));
        let mut c = match tls {
            None => config.connect(postgres::NoTls)?,
            Some(tls) => config.connect(tls)?,
        };
        c.batch_execute(&format!("SET lock_timeout = '{LOCK_TIMEOUT}'"))?;
        Ok::<_, postgres::Error>(c)
    })?)
}

/// One connection to the hub's database.
pub(crate) enum Conn {
    Lite(rusqlite::Connection),
    /// The client (always `Some` but while it is dropped), its connection string, to
    /// connect again when the server closed the connection (a restart, a failover) outside
    /// a transaction, and whether a transaction is open (then a closed connection is an
    /// error: its statements must not go on outside it).
    Pg(RefCell<Option<postgres::Client>>, String, std::cell::Cell<bool>),
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Closing the client blocks on its runtime too.
        if let Conn::Pg(c, ..) = self
            && let Some(client) = c.get_mut().take()
        {
            off_runtime(move || drop(client));
        }
    }
}

impl Conn {
    fn set_in_tx(&self, open: bool) {
        if let Conn::Pg(_, _, in_tx) = self {
            in_tx.set(open);
        }
    }

    /// Whether this is PostgreSQL.
    pub(crate) fn is_pg(&self) -> bool {
        matches!(self, Conn::Pg(..))
    }

    /// Runs `f` on the PostgreSQL client. Outside a transaction, a connection the server
    /// closed (a restart, a failover, an administrator) is opened again: before `f` when the
    /// client knows it is closed, and, for an `idempotent` statement (a read, a `BEGIN`, the
    /// schema), once after `f` failed on it (a write may have been applied before the
    /// connection went: it is not sent twice, its error is returned).
    fn pg<T: Send>(
        (client, url, in_tx): (&RefCell<Option<postgres::Client>>, &str, &std::cell::Cell<bool>),
        idempotent: bool,
        f: impl Fn(&mut postgres::Client) -> Result<T, postgres::Error> + Sync,
    ) -> Result<T, DbError> {
        let mut c = client.borrow_mut();
        let reopen = |c: &mut Option<postgres::Client>| -> Result<(), DbError> {
            tracing::warn!("the PostgreSQL connection was closed; connecting again");
            *c = Some(connect(url)?);
            Ok(())
        };
        if !in_tx.get() && c.as_ref().is_some_and(postgres::Client::is_closed) {
            reopen(&mut c)?;
        }
        let client: &mut postgres::Client = c.as_mut().expect("the client is open until dropped");
        match off_runtime(|| f(client)) {
            // The server's notice that it ends the connection (an administrator, a shutdown)
            // may come as the answer to this statement, before the client sees it closed.
            Err(e)
                if idempotent
                    && !in_tx.get()
                    && (e.is_closed()
                        || client.is_closed()
                        || e.code().is_some_and(|c| {
                            *c == postgres::error::SqlState::ADMIN_SHUTDOWN
                                || *c == postgres::error::SqlState::CRASH_SHUTDOWN
                        })) =>
            {
                reopen(&mut c)?;
                let client: &mut postgres::Client = c.as_mut().expect("just opened");
                Ok(off_runtime(|| f(client))?)
            }
            other => Ok(other?),
        }
    }

    fn pg_params(params: &[Param]) -> Vec<&(dyn postgres::types::ToSql + Sync)> {
        params.iter().map(Param::as_pg).collect()
    }

    /// Runs statements without parameters (schema, transaction control).
    pub(crate) fn execute_batch(&self, sql: &str) -> Result<(), DbError> {
        match self {
            Conn::Lite(c) => Ok(c.execute_batch(sql)?),
            Conn::Pg(c, url, in_tx) => Self::pg((c, url, in_tx), true, |c| c.batch_execute(sql)),
        }
    }

    /// Runs a statement: the number of rows it changed.
    ///
    /// # Errors
    /// [`DbError::Nul`] for a text parameter holding U+0000, before anything is sent.
    pub(crate) fn execute<P: AsRef<[Param]>>(&self, sql: &str, params: P) -> Result<usize, DbError> {
        let params = params.as_ref();
        if params.iter().any(|p| matches!(p, Param::Text(Some(t)) if t.contains('\0'))) {
            return Err(DbError::Nul);
        }
        match self {
            Conn::Lite(c) => Ok(c.execute(sql, rusqlite::params_from_iter(params.iter()))?),
            Conn::Pg(c, url, in_tx) => {
                let sql = pg_sql(sql);
                let n = Self::pg((c, url, in_tx), false, |c| c.execute(sql.as_str(), &Self::pg_params(params)))?;
                Ok(usize::try_from(n).unwrap_or(usize::MAX))
            }
        }
    }

    /// The first row of a query, mapped by `f`; [`DbError::NoRows`] when there is none.
    pub(crate) fn query_row<T, P: AsRef<[Param]>>(
        &self,
        sql: &str,
        params: P,
        f: impl FnOnce(&Row<'_>) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        let params = params.as_ref();
        match self {
            Conn::Lite(c) => {
                let mut stmt = c.prepare(sql)?;
                let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
                match rows.next()? {
                    Some(r) => f(&Row::Lite(r)),
                    None => Err(DbError::NoRows),
                }
            }
            Conn::Pg(c, url, in_tx) => {
                let sql = pg_sql(sql);
                // The first row, as SQLite gives it (`query_opt` refuses more than one).
                let row = Self::pg((c, url, in_tx), true, |c| c.query(sql.as_str(), &Self::pg_params(params)))?
                    .into_iter()
                    .next();
                match row {
                    Some(r) => f(&Row::Pg(&r)),
                    None => Err(DbError::NoRows),
                }
            }
        }
    }

    /// Every row of a query, mapped by `f`.
    pub(crate) fn query_all<T, P: AsRef<[Param]>>(
        &self,
        sql: &str,
        params: P,
        mut f: impl FnMut(&Row<'_>) -> Result<T, DbError>,
    ) -> Result<Vec<T>, DbError> {
        let params = params.as_ref();
        match self {
            Conn::Lite(c) => {
                let mut stmt = c.prepare(sql)?;
                let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    out.push(f(&Row::Lite(r))?);
                }
                Ok(out)
            }
            Conn::Pg(c, url, in_tx) => {
                let sql = pg_sql(sql);
                let rows = Self::pg((c, url, in_tx), true, |c| c.query(sql.as_str(), &Self::pg_params(params)))?;
                rows.iter().map(|r| f(&Row::Pg(r))).collect()
            }
        }
    }

    /// The hub's tables, by name.
    pub(crate) fn tables(&self) -> Result<Vec<String>, DbError> {
        let sql = match self {
            Conn::Lite(_) => {
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
            }
            Conn::Pg(..) => {
                "SELECT table_name::text FROM information_schema.tables
                 WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' ORDER BY table_name"
            }
        };
        self.query_all(sql, params![], |r| r.get(0))
    }

    /// A table's columns: name, and whether it holds integers (empty: no such table).
    pub(crate) fn table_columns(&self, table: &str) -> Result<Vec<(String, bool)>, DbError> {
        let sql = match self {
            Conn::Lite(_) => "SELECT name, type FROM pragma_table_info(?1)",
            Conn::Pg(..) => {
                "SELECT column_name::text, data_type::text FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name = ?1 ORDER BY ordinal_position"
            }
        };
        self.query_all(sql, params![table], |r| {
            let ty: String = r.get(1)?;
            let ty = ty.to_ascii_uppercase();
            Ok((r.get(0)?, ty.contains("INT")))
        })
    }

    /// A query to run with [`Stmt::query_map`] (rusqlite's shape).
    pub(crate) fn prepare<'c>(&'c self, sql: &str) -> Result<Stmt<'c>, DbError> {
        Ok(Stmt { conn: self, sql: sql.to_owned() })
    }

    /// The column names of a query's result (for dumps).
    pub(crate) fn columns(&self, sql: &str) -> Result<Vec<String>, DbError> {
        match self {
            Conn::Lite(c) => Ok(c.prepare(sql)?.column_names().map(str::to_owned).collect()),
            Conn::Pg(c, url, in_tx) => {
                let sql = pg_sql(sql);
                let stmt = Self::pg((c, url, in_tx), true, |c| c.prepare(sql.as_str()))?;
                Ok(stmt.columns().iter().map(|c| c.name().to_owned()).collect())
            }
        }
    }
}

/// A query of [`Conn::prepare`].
pub(crate) struct Stmt<'c> {
    conn: &'c Conn,
    sql: String,
}

impl Stmt<'_> {
    /// Every row, mapped by `f`, each as a result (rusqlite's shape).
    pub(crate) fn query_map<T, P: AsRef<[Param]>>(
        &mut self,
        params: P,
        f: impl FnMut(&Row<'_>) -> Result<T, DbError>,
    ) -> Result<std::vec::IntoIter<Result<T, DbError>>, DbError> {
        Ok(self.conn.query_all(&self.sql, params, f)?.into_iter().map(Ok).collect::<Vec<_>>().into_iter())
    }
}

/// What a transaction is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TxKind {
    /// Reads of one moment.
    Read,
    /// A write: holds the database's write lock from its start.
    Write,
}

/// A transaction on the locked connection; rolled back when dropped uncommitted.
pub(crate) struct Tx<'a> {
    conn: MutexGuard<'a, Conn>,
    open: bool,
}

impl<'a> Tx<'a> {
    /// Begins a transaction on `conn`, locked.
    pub(crate) fn begin(conn: &'a Mutex<Conn>, kind: TxKind) -> Result<Tx<'a>, DbError> {
        let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
        Self::begin_on(conn, kind)
    }

    /// Begins a transaction on a connection already locked.
    pub(crate) fn begin_on(conn: MutexGuard<'a, Conn>, kind: TxKind) -> Result<Tx<'a>, DbError> {
        let sql = match (&*conn, kind) {
            (Conn::Lite(_), TxKind::Read) => "BEGIN DEFERRED".to_owned(),
            (Conn::Lite(_), TxKind::Write) => "BEGIN IMMEDIATE".to_owned(),
            (Conn::Pg(..), TxKind::Read) => "BEGIN ISOLATION LEVEL REPEATABLE READ".to_owned(),
            (Conn::Pg(..), TxKind::Write) => format!("BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK})"),
        };
        if let Err(e) = conn.execute_batch(&sql) {
            // A BEGIN that went through with a lock that did not (a lock timeout, a cancel)
            // leaves an aborted transaction on the server: end it, so the connection serves on.
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e);
        }
        conn.set_in_tx(true);
        Ok(Tx { conn, open: true })
    }

    /// Commits; a commit that fails is rolled back, so the connection serves on.
    pub(crate) fn commit(mut self) -> Result<(), DbError> {
        self.open = false;
        let done = self.conn.execute_batch("COMMIT");
        if done.is_err() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        self.conn.set_in_tx(false);
        done
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.conn
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if self.open {
            let _ = self.conn.execute_batch("ROLLBACK");
            self.conn.set_in_tx(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::pg_sql;

    #[test]
    fn placeholders_become_postgres_ones_outside_quoted_text() {
        assert_eq!(pg_sql("SELECT a FROM t WHERE b = ?1 AND c = ?12"), "SELECT a FROM t WHERE b = $1 AND c = $12");
        assert_eq!(pg_sql("VALUES (?, ?, '?x', ?)"), "VALUES ($1, $2, '?x', $3)");
        assert_eq!(pg_sql("no parameters"), "no parameters");
    }
}

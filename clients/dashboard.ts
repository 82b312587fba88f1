// Typed helpers for a web app's dashboard, over the generated contract in metrics.ts.
// Dependency-free: plain TypeScript and the JavaScript Intl API, for a browser or a server.

import {
  FUNCTIONS,
  PLATFORM_METRIC_NAMES,
  SCHEDULE,
  USER_METRIC_NAMES,
  type Comparison,
  type DashboardFunction,
  type PlatformMetricName,
  type Trend,
  type Unit,
  type UserKey,
  type UserMetricName,
} from "./metrics.js";

/** The comparison and date of one call; both default on the server (the day before; yesterday). */
export interface CallOptions {
  /** Statistics date as YYYY-MM-DD; omitted: yesterday in the statistics time zone. */
  readonly date?: string;
  readonly compare?: Comparison;
}

/** A database function call for a PostgREST client: `supabase.schema(schema).rpc(fn, args)`. */
export interface RpcCall<F extends DashboardFunction, A> {
  readonly schema: string;
  readonly fn: F;
  readonly args: A;
}

export interface UserMetricArgs {
  readonly p_user_id: UserKey;
  readonly p_metric: UserMetricName;
  readonly p_date?: string;
  readonly p_compare?: Comparison;
}

export interface PlatformMetricArgs {
  readonly p_metric: PlatformMetricName;
  readonly p_date?: string;
  readonly p_compare?: Comparison;
}

export interface UserKpisArgs {
  readonly p_user_id: UserKey;
  readonly p_date?: string;
  readonly p_compare?: Comparison;
}

const ISO_DATE = /^(\d{4})-(\d{2})-(\d{2})$/;

// Options left out stay out of args: PostgREST picks a function by the argument names it is
// sent, and an absent argument takes the function's default.
function optional(options: CallOptions): { p_date?: string; p_compare?: Comparison } {
  const out: { p_date?: string; p_compare?: Comparison } = {};
  if (options.date !== undefined) {
    const parts = ISO_DATE.exec(options.date);
    const day = parts ? new Date(Date.UTC(+parts[1], +parts[2] - 1, +parts[3])) : null;
    if (!day || day.toISOString().slice(0, 10) !== options.date) {
      throw new RangeError(`date ${JSON.stringify(options.date)} is not a calendar date YYYY-MM-DD`);
    }
    out.p_date = options.date;
  }
  if (options.compare !== undefined) out.p_compare = options.compare;
  return out;
}

function call<F extends DashboardFunction, A>(fn: F, args: A): RpcCall<F, A> {
  return { schema: FUNCTIONS[fn].schema, fn, args };
}

/** user_metric: one metric of one user, with its comparison; the RPC returns one MetricRow. */
export function userMetricRpc(
  userId: UserKey,
  metric: UserMetricName,
  options: CallOptions = {},
): RpcCall<"user_metric", UserMetricArgs> {
  return call("user_metric", { p_user_id: userId, p_metric: metric, ...optional(options) });
}

/** platform_metric: one platform metric, with its comparison; the RPC returns one MetricRow. */
export function platformMetricRpc(
  metric: PlatformMetricName,
  options: CallOptions = {},
): RpcCall<"platform_metric", PlatformMetricArgs> {
  return call("platform_metric", { p_metric: metric, ...optional(options) });
}

/** user_kpis: the KPI set of the user's role, in order; the RPC returns KpiRow[]. */
export function userKpisRpc(userId: UserKey, options: CallOptions = {}): RpcCall<"user_kpis", UserKpisArgs> {
  return call("user_kpis", { p_user_id: userId, ...optional(options) });
}

/** True when name is a user metric: narrows a route parameter or a saved setting. */
export function isUserMetricName(name: string): name is UserMetricName {
  return (USER_METRIC_NAMES as readonly string[]).includes(name);
}

/** True when name is a platform metric. */
export function isPlatformMetricName(name: string): name is PlatformMetricName {
  return (PLATFORM_METRIC_NAMES as readonly string[]).includes(name);
}

/** A numeric field as a number: node-postgres delivers numeric as a string, PostgREST as a number. */
export function toNumber(value: number | string | null): number | null {
  if (value === null) return null;
  const number = typeof value === "number" ? value : value.trim() === "" ? NaN : Number(value);
  if (!Number.isFinite(number)) throw new TypeError(`not a number: ${JSON.stringify(value)}`);
  return number;
}

export interface FormatOptions {
  /** BCP 47 locale; default "en-US". */
  readonly locale?: string;
  /** ISO 4217 code for money, e.g. "EUR"; default: a plain number with 2 decimals. */
  readonly currency?: string;
  /** Show + before positive numbers, as for a change. */
  readonly signed?: boolean;
}

/** What formatValue shows for a NULL: no row yet, or no review or score to average. */
export const NO_VALUE = "—";

const SUFFIX: { readonly [U in Unit]: string } = {
  money: "",
  count: "",
  hours: " h",
  rating: "",
  score: "",
  percent: "%",
};

/** A value for display by its unit: counts whole; money, hours, ratings, scores, percents with 2 decimals. */
export function formatValue(value: number | string | null, unit: Unit, options: FormatOptions = {}): string {
  const number = toNumber(value);
  if (number === null) return NO_VALUE;
  const digits = unit === "count" ? 0 : 2;
  const format = new Intl.NumberFormat(options.locale ?? "en-US", {
    minimumFractionDigits: digits,
    maximumFractionDigits: digits,
    signDisplay: options.signed ? "exceptZero" : "auto",
    ...(unit === "money" && options.currency ? { style: "currency", currency: options.currency } : {}),
  });
  return format.format(number) + SUFFIX[unit];
}

/** change_pct for display: "+23.23%", "-100.00%", or NO_VALUE when there is no percentage. */
export function formatChangePct(changePct: number | string | null, locale = "en-US"): string {
  return formatValue(changePct, "percent", { locale, signed: true });
}

const ARROWS: { readonly [T in Trend]: string } = { up: "▲", down: "▼", neutral: "•" };

/** The trend mark the statskit CLI prints too: ▲ up, ▼ down, • neutral. */
export function trendArrow(trend: Trend): string {
  return ARROWS[trend];
}

export interface CacheOptions {
  /** Which rollup: the user job runs after the platform job. Default "user". */
  readonly table?: "user" | "platform";
  /** How long the nightly job may take; values may change until then. Default 60. */
  readonly jobMinutes?: number;
}

const DAY_MS = 86_400_000;

/** Milliseconds since local midnight of the wall clock in timeZone at instant. */
function msIntoLocalDay(instant: Date, timeZone: string): number {
  const parts = new Intl.DateTimeFormat("en-US", {
    timeZone,
    hourCycle: "h23",
    hour: "numeric",
    minute: "numeric",
    second: "numeric",
  }).formatToParts(instant);
  const field = (type: string) => Number(parts.find((p) => p.type === type)?.value ?? 0);
  return ((field("hour") * 60 + field("minute")) * 60 + field("second")) * 1000 + instant.getUTCMilliseconds();
}

/** The first local midnight in timeZone after now (23- and 25-hour days included). */
export function nextMidnight(now: Date, timeZone: string): Date {
  let candidate = now.getTime() + DAY_MS - msIntoLocalDay(now, timeZone);
  // Across a daylight-saving change the wall clock reads 23:00 or 01:00 there: step to 00:00.
  const off = msIntoLocalDay(new Date(candidate), timeZone);
  if (off !== 0) candidate += off < DAY_MS / 2 ? -off : DAY_MS - off;
  return new Date(candidate);
}

/**
 * How many seconds a client may cache a rollup value fetched at now: until the nightly job has
 * written the next day (its UTC start plus jobMinutes), or until the default date moves on at
 * midnight in the statistics time zone, whichever comes first. Use it as React Query's
 * staleTime (times 1000) or as Cache-Control max-age.
 */
export function rollupMaxAgeSeconds(now: Date, options: CacheOptions = {}): number {
  const jobMinutes = options.jobMinutes ?? 60;
  if (!(jobMinutes >= 0 && jobMinutes < 1440)) throw new RangeError(`jobMinutes ${jobMinutes}: use 0 to 1439`);
  const job = options.table === "platform" ? SCHEDULE.platformJobUtc : SCHEDULE.userJobUtc;
  const doneMs = (job.hour * 60 + job.minute + jobMinutes) * 60_000;
  const dayStart = now.getTime() - (now.getTime() % DAY_MS);
  let refreshed = dayStart - DAY_MS + doneMs; // yesterday's run may still be under way
  while (refreshed <= now.getTime()) refreshed += DAY_MS;
  const until = Math.min(refreshed, nextMidnight(now, SCHEDULE.timeZone).getTime());
  return Math.max(1, Math.floor((until - now.getTime()) / 1000));
}

// TypeScript declarations for jobwire-react, the React bindings of jobwire.js.
import type { ReactNode, ReactElement } from "react";
import type { Client, Job, JobSnapshot, Json, Status, SubmitResult } from "jobwire";

export interface JobwireProviderProps {
  /** A client made with createClient(); or else `url` and `token` make one. */
  client?: Client;
  url?: string;
  /** A token, or a stable function returning fresh ones (a new function is a new client). */
  token?: string | (() => string | Promise<string>);
  children?: ReactNode;
}

/** Give the hooks a client. Without a provider they use the page's origin and cookie. */
export declare function JobwireProvider(props: JobwireProviderProps): ReactElement;

/** The provider's client (or the page's own). */
export declare function useJobwire(): Client;

/** What useJob returns once a job cannot be followed (e.g. it was deleted: HttpError 404). */
export interface JobGone {
  readonly id: string;
  readonly error: Error;
}

/**
 * The live snapshot of a job: undefined while it loads, null for a null id. The same
 * frozen object until the job's next event; never another job's state.
 */
export declare function useJob(id: string): JobSnapshot | JobGone | undefined;
export declare function useJob(id: string | null | undefined): JobSnapshot | JobGone | null | undefined;

/**
 * The caller's jobs, kept live by jobwire.js's owner feed `jw.jobs({status}, callback)`:
 * undefined while loading. Throws if the jobwire.js in use has no such feed.
 */
export declare function useJobs(query?: { status?: "active" | Status }): readonly Job[] | undefined;

export interface SubmitState {
  /** A submission is in flight. */
  readonly pending: boolean;
  /** Why the last submission failed, else null. */
  readonly error: Error | null;
  /** False when an active job of the same task and key was already running. */
  readonly created: boolean | undefined;
  /** The job the last submission created or found running. */
  readonly job: Job | undefined;
  /**
   * Submit one job. A call while one is in flight returns that promise. Resolves to
   * undefined on failure (see `error`); never rejects.
   */
  submit(input?: Json, options?: { key?: string | null }): Promise<SubmitResult | undefined>;
}

export declare function useSubmit(task: string): SubmitState;

-- The reference marketplace's source tables (docs/contract.md), as the
-- demo, the tests and the benchmarks create them. An application brings its own; statskit
-- only reads these names and columns. Indexes: primary keys and one per foreign key.

create table profiles (
    id uuid primary key,
    role text not null check (role in ('tutor', 'client', 'agent')),
    created_at timestamptz not null
);

create table listings (
    id bigint primary key,
    tutor_id uuid not null references profiles,
    created_at timestamptz not null,
    published_at timestamptz,
    archived_at timestamptz
);
create index listings_tutor_id_idx on listings (tutor_id);

create table listing_views (
    id bigint primary key,
    listing_id bigint not null references listings,
    viewer_id uuid references profiles,
    viewed_at timestamptz not null
);
create index listing_views_listing_id_idx on listing_views (listing_id);

create table bookings (
    id bigint primary key,
    listing_id bigint references listings,
    tutor_id uuid not null references profiles,
    client_id uuid not null references profiles,
    status text not null check (status in ('pending', 'confirmed', 'completed', 'cancelled')),
    created_at timestamptz not null,
    confirmed_at timestamptz,
    cancelled_at timestamptz,
    completed_at timestamptz,
    session_start timestamptz not null,
    duration_minutes integer not null check (duration_minutes > 0)
);
create index bookings_listing_id_idx on bookings (listing_id);
create index bookings_tutor_id_idx on bookings (tutor_id);
create index bookings_client_id_idx on bookings (client_id);

create table transactions (
    id bigint primary key,
    user_id uuid not null references profiles,
    booking_id bigint references bookings,
    kind text not null check (kind in ('earning', 'payment', 'refund', 'referral_commission')),
    amount numeric(12,2) not null check (amount >= 0),
    created_at timestamptz not null,
    available_at timestamptz
);
create index transactions_user_id_idx on transactions (user_id);
create index transactions_booking_id_idx on transactions (booking_id);

create table reviews (
    id bigint primary key,
    booking_id bigint references bookings,
    reviewer_id uuid not null references profiles,
    reviewee_id uuid not null references profiles,
    rating smallint not null check (rating between 1 and 5),
    created_at timestamptz not null
);
create index reviews_booking_id_idx on reviews (booking_id);
create index reviews_reviewer_id_idx on reviews (reviewer_id);
create index reviews_reviewee_id_idx on reviews (reviewee_id);

create table messages (
    id bigint primary key,
    conversation_id bigint not null,
    sender_id uuid not null references profiles,
    recipient_id uuid not null references profiles,
    created_at timestamptz not null,
    read_at timestamptz
);
create index messages_sender_id_idx on messages (sender_id);
create index messages_recipient_id_idx on messages (recipient_id);

create table referrals (
    id bigint primary key,
    referrer_id uuid not null references profiles,
    referred_id uuid references profiles,
    created_at timestamptz not null,
    converted_at timestamptz,
    commission numeric(12,2) not null default 0
);
create index referrals_referrer_id_idx on referrals (referrer_id);
create index referrals_referred_id_idx on referrals (referred_id);

create table caas_scores (
    id bigint primary key,
    user_id uuid not null references profiles,
    score numeric(5,2) not null check (score between 0 and 100),
    profile_completeness numeric(5,2) not null check (profile_completeness between 0 and 100),
    computed_at timestamptz not null
);
create index caas_scores_user_id_idx on caas_scores (user_id);

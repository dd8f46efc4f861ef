/*
 * Conversations: the lobby, the rooms the user is a member of, and private
 * conversations (PMs), each with its own lines, history paging state and
 * unread count; rooms also with their members.
 *
 * A conversation's key is `room:<name in lower case>` (room names are
 * unique whatever their case; the server always sends the canonical
 * spelling, kept in `name`) or `dm:<peer>` (user names keep their case).
 *
 * Unread counts follow the server's `conversations` summary: its `unread`
 * counts chats from others up to the summary's `position`; lines that
 * arrive with a later position are counted here on top.
 */
(function (ChatApp, Backbone, _) {
  'use strict';

  var models = ChatApp.models;

  function toPosition(value) {
    return typeof value === 'number' && isFinite(value) ? value : undefined;
  }

  // A room member and whether they are online (presence is global).
  var MemberModel = Backbone.Model.extend({
    idAttribute: 'name',
    defaults: { name: '', online: false }
  });

  var MemberCollection = Backbone.Collection.extend({
    model: MemberModel,

    onlineCount: function () {
      return this.filter(function (m) { return m.get('online'); }).length;
    }
  });

  // Lines of a room or a PM: every one has its log position, so they are
  // kept in position order and a line delivered twice is shown once.
  var PositionedChats = models.ChatCollection.extend({
    comparator: 'position'
  });

  var ConversationModel = Backbone.Model.extend({
    idAttribute: 'key',
    defaults: function () {
      return {
        key: '',
        kind: 'room',            // lobby | room | private
        name: '',                // the room's canonical name, or the peer's name
        topic: '',
        peerOnline: false,       // private: whether the peer is online
        unread: 0,
        historyAvailable: false, // a page of history was merged: older pages can be asked for
        reachedStart: false,
        loadingOlder: false,
        joinedPosition: 0,       // room: the position of our create/join, when known here
        readSent: 0,             // the highest position marked read (by us or the summary)
        lastPosition: 0,         // the summary's last position in this conversation
        activity: 0,             // the newest position known: orders private conversations
        draft: ''                // text typed but not sent, kept while another conversation is shown
      };
    },

    initialize: function (attrs, options) {
      this.chats = (options && options.chats) || new PositionedChats();
      this.uploads = new models.PendingUploads(); // files for the next message typed here
      this.members = new MemberCollection();
      this.membersLoaded = false;
      this.loaded = false;  // its latest history page was merged (rooms and PMs)
      this.loading = false;
      this.generation = 0;  // bumped by forget(): answers to requests made before are dropped
    },

    isLobby: function () { return this.get('kind') === 'lobby'; },
    isRoom: function () { return this.get('kind') !== 'private'; },

    // What a `chat` carries to reach this conversation (null: the lobby's seed chat).
    target: function () {
      if (this.isLobby()) {
        return null;
      }
      return this.isRoom() ? { room: this.get('name') } : { to: this.get('name') };
    },

    // What `history` and `markRead` carry to mean this conversation.
    scope: function () {
      return this.isRoom() ? { room: this.get('name') } : { with: this.get('name') };
    },

    // The newest position known in this conversation.
    latestPosition: function () {
      var newest = this.chats.reduce(function (max, m) {
        var p = m.get('position');
        return p !== undefined && p > max ? p : max;
      }, 0);
      return Math.max(newest, this.get('lastPosition'));
    },

    // Counts toward unread: a chat from someone else.
    countsAsUnread: function (line, me) {
      return line.kind === 'chat' && line.sender !== me;
    },

    // Chats from others that arrived after `position`.
    unreadAfter: function (position, me) {
      return this.chats.filter(function (m) {
        var p = m.get('position');
        return p !== undefined && p > position && this.countsAsUnread(m.attributes, me);
      }, this).length;
    },

    // Add lines (with positions) not shown yet; returns the ones added.
    addLines: function (lines) {
      var fresh = _.filter(lines, function (line) {
        return line.position !== undefined && !this.chats.get(line.position);
      }, this);
      if (fresh.length) {
        this.chats.add(fresh);
        this.set('activity', Math.max(this.get('activity'), _.max(_.pluck(fresh, 'position'))));
      }
      return fresh;
    },

    // A page of history (oldest first). `latest`: the newest page, asked for
    // when the conversation is first shown; otherwise an older page.
    mergePage: function (page, latest) {
      var added = this.addLines(_.map(itemsOf(page), lineFromItem));
      this.loaded = this.loaded || latest;
      this.set({
        historyAvailable: true,
        reachedStart: !!page.reachedStart || (!latest && !added.length),
        loadingOlder: false
      });
    },

    // Start again from the server's history (after a re-login that was not a
    // resume, what was missed is not replayed).
    forget: function () {
      this.chats.reset();
      this.members.reset();
      this.membersLoaded = false;
      this.loadingMembers = false;
      this.loaded = false;
      this.loading = false;
      this.generation += 1;
      this.set({ historyAvailable: false, reachedStart: false, loadingOlder: false });
    },

    setMembers: function (members) {
      this.membersLoaded = true;
      this.members.reset(_.map(_.filter(members, _.isObject), function (m) {
        return { name: String(m.name), online: !!m.online };
      }));
    }
  });

  var ConversationCollection = Backbone.Collection.extend({
    model: ConversationModel
  });

  // The room directory (`listRooms`), a page at a time, and the create form's state.
  var DirectoryModel = Backbone.Model.extend({
    defaults: { loading: false, more: false, error: '', createError: '', creating: false },

    initialize: function () {
      this.rooms = new Backbone.Collection();
    },

    // A page of `listRooms`; `first`: it starts the list again.
    addPage: function (answer, first) {
      var listed = _.filter(_.isArray(answer.rooms) ? answer.rooms : [], function (r) {
        return _.isObject(r) && typeof r.room === 'string';
      });
      var last = _.last(listed);
      // The lobby is always first in the conversation list: not listed here.
      var rooms = _.map(_.reject(listed, function (r) { return r.room.toLowerCase() === 'lobby'; }), function (r) {
        return {
          id: r.room.toLowerCase(), room: r.room, topic: String(r.topic || ''),
          members: toPosition(r.members) || 0, online: toPosition(r.online) || 0
        };
      });
      if (first) {
        this.rooms.reset(rooms);
      } else {
        this.rooms.add(rooms, { merge: true });
      }
      if (last) {
        this.after = last.room;
      }
      this.set({ loading: false, error: '', more: !!answer.more && !!last });
    },

    // The name to page on from: the last one listed.
    lastRoom: function () {
      return this.after || null;
    }
  });

  // Well-formed history items, oldest first: the lobby's kinds and a room's
  // `created` and a PM's `private`.
  var KINDS = ['chat', 'join', 'leave', 'created', 'private'];

  function itemsOf(history) {
    var items = history && _.isArray(history.items) ? history.items : [];
    return _.sortBy(_.filter(items, function (item) {
      return item && toPosition(item.position) !== undefined && _.contains(KINDS, item.kind);
    }), 'position');
  }

  function lineFromItem(item) {
    var line = { time: item.time || null, position: item.position };
    if (item.kind === 'chat' || item.kind === 'private') {
      return _.extend(line, {
        kind: 'chat', sender: String(item.sender), message: String(item.message),
        attachments: models.attachmentsOf(item.attachments)
      });
    }
    if (item.kind === 'created') {
      return _.extend(line, { kind: 'created', name: String(item.name), message: String(item.topic || '') });
    }
    return _.extend(line, { kind: item.kind, name: String(item.name) });
  }

  _.extend(models, {
    MemberModel: MemberModel,
    MemberCollection: MemberCollection,
    PositionedChats: PositionedChats,
    ConversationModel: ConversationModel,
    ConversationCollection: ConversationCollection,
    DirectoryModel: DirectoryModel,
    toPosition: toPosition,
    historyItems: itemsOf,
    lineFromItem: lineFromItem
  });
})(ChatApp, Backbone, _);
